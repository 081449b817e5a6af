"""The feature-grid convention: pixels <-> feature cells, sampling, resizing and grid sizes.

The one home of this convention: the training losses, the evaluation metrics, the feature
cache, segmentation and both Nerfstudio models use these functions. It is the core's
pixel-centre convention carried to the feature grid, i.e. ``grid_sample(..., align_corners=False)``:

* An image is ``H x W`` pixels and its feature map ``h x w`` cells, ``H = p*h``, ``W = p*w``.
* Pixel coordinates ``(u, v)``: ``u`` along the width, ``v`` along the height; the top-left
  corner of the image is ``(0, 0)`` and the centre of pixel ``(row i, col j)`` is
  ``(j + 0.5, i + 0.5)`` (COLMAP / OpenCV-with-centres).
* Normalised coordinates ``(x, y)`` in ``[-1, 1]``: ``x = 2u/W - 1``, ``y = 2v/H - 1``; ``-1`` is the
  left/top image *edge*, ``+1`` the right/bottom edge.
* Feature cell ``(row r, col c)`` covers pixels ``[c*p, (c+1)*p) x [r*p, (r+1)*p)``; its centre is
  at pixel ``((c + 0.5) p, (r + 0.5) p)``, i.e. normalised ``x = (2c + 1)/w - 1``. More generally
  an ``h x w`` map spanning an ``H x W`` image (any sizes) has cell ``(r, c)`` centred at pixel
  ``((c + 0.5) W / w, (r + 0.5) H / h)``.
* Sampling between cell centres is bilinear; outside the outermost centres the border cell's
  value is used (``padding_mode="border"``). Resizing a map is bilinear with the same mapping,
  antialiased when it shrinks.

The MVFM authors' soft-argmax grid used ``linspace(-1, 1, w)`` (``align_corners=True``): cell
centres at the image edges, half a cell off the pixel-centre ground truth near the borders.
Here grid and ground truth agree, so a perfect match has zero loss up to quantisation.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "pixel_to_normalized", "normalized_to_pixel", "cell_centers", "sample_features", "sample_views", "query_similarity",
    "sample_map", "bilinear_taps", "resize_map", "grid_for_long_side", "input_size_for", "floor_to_patch",
]

Size = Tuple[int, int]


def pixel_to_normalized(xy: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Pixel coordinates ``[..., 2]`` (u, v) of an ``(H, W)`` image -> normalised ``[-1, 1]`` (x, y)."""
    h, w = size
    scale = torch.tensor([2.0 / w, 2.0 / h], dtype=xy.dtype, device=xy.device)
    return xy * scale - 1.0


def normalized_to_pixel(xy: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`pixel_to_normalized`."""
    h, w = size
    scale = torch.tensor([w / 2.0, h / 2.0], dtype=xy.dtype, device=xy.device)
    return (xy + 1.0) * scale


def cell_centers(grid: Tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised (x, y) centres of an ``(h, w)`` feature grid, row-major: ``[h*w, 2]``."""
    h, w = grid
    xs = (2 * torch.arange(w, device=device, dtype=dtype) + 1) / w - 1
    ys = (2 * torch.arange(h, device=device, dtype=dtype) + 1) / h - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


def sample_features(features: torch.Tensor, xy_norm: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample feature maps at normalised points.

    Args:
        features: ``[N, C, h, w]`` maps.
        xy_norm: ``[N, P, 2]`` normalised (x, y) points, one set per map.

    Returns:
        ``[N, P, C]``. Points between the outermost cell centres and the image edge take the
        border cell's value (``padding_mode="border"``).
    """
    out = F.grid_sample(features, xy_norm.unsqueeze(1).to(features.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # [N, C, 1, P]
    return out[:, :, 0].transpose(1, 2)


def sample_views(features: torch.Tensor, view: torch.Tensor, xy_norm: torch.Tensor) -> torch.Tensor:
    """Bilinear features ``[P, C]`` of points ``xy_norm [P, 2]`` (normalised) on maps ``features[view]``.

    Args:
        features: ``[S, C, h, w]``; view: ``[P]`` long positions 0..S-1.
    """
    s, p = features.shape[0], view.shape[0]
    # sample every point on every map (S*P*C values, cheap) and keep the one on its own view
    sampled = sample_features(features, xy_norm.unsqueeze(0).expand(s, p, 2))  # [S, P, C]
    return sampled[view, torch.arange(p, device=features.device)]


def query_similarity(
    features: torch.Tensor, src_view: torch.Tensor, dst_view: torch.Tensor, src_xy_norm: torch.Tensor
) -> torch.Tensor:
    """Cosine similarity of each query feature to every cell of its target view's map.

    The query feature is bilinearly sampled at the query point of its source view (raw
    features, then normalised); target cells are the normalised feature vectors.

    Args:
        features: ``[S, C, h, w]`` feature maps of one view set.
        src_view, dst_view: ``[P]`` long, view positions 0..S-1 of query and target.
        src_xy_norm: ``[P, 2]`` normalised query points in the source views.

    Returns:
        ``[P, h*w]`` cosine similarities, cells row-major (see :func:`cell_centers`).
    """
    h, w = features.shape[-2:]
    p = src_view.shape[0]
    query = F.normalize(sample_views(features, src_view, src_xy_norm), dim=-1)  # [P, C]
    cells = F.normalize(features.flatten(2), dim=1)  # [S, C, h*w]
    # per target view: the queries aimed at it against its cells (no [P, C, h*w] gather)
    sim = features.new_empty(p, h * w)
    for view in torch.unique(dst_view).tolist():
        sel = dst_view == view
        sim[sel] = query[sel] @ cells[view]
    return sim


def sample_map(feature_map: torch.Tensor, xy: torch.Tensor, image_size: Size) -> torch.Tensor:
    """Bilinear features of a channels-last map at pixel coordinates of the image it spans.

    Args:
        feature_map: ``[h, w, D]`` spanning an ``H x W`` image.
        xy: ``[2]`` or ``[R, 2]`` pixel coordinates ``(x, y)``, pixel centres at ``(col + 0.5, row + 0.5)``.
        image_size: ``(H, W)``.

    Returns:
        ``[D]`` or ``[R, D]`` float32 (border cells outside the outermost cell centres).
    """
    pts = torch.as_tensor(xy, dtype=torch.float32, device=feature_map.device)
    flat = pts.reshape(-1, 2)
    norm = pixel_to_normalized(flat, image_size)
    out = sample_features(feature_map.permute(2, 0, 1)[None].float(), norm[None])[0]  # [R, D]
    return out[0] if pts.ndim == 1 else out


def bilinear_taps(xy: torch.Tensor, image_size: torch.Tensor, grid: Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """The four cells and weights that bilinear sampling at pixel coordinates combines.

    The same result as :func:`sample_map` (``sum_k weights[k] * map.flat[cells[k]]``), for maps
    that are read cell by cell (memory-mapped caches): only the tapped cells need to be read.

    Args:
        xy: ``[R, 2]`` pixel coordinates (pixel centres at ``col + 0.5``).
        image_size: ``[R, 2]`` ``(H, W)`` of each point's image (or ``[2]`` for all).
        grid: ``(h, w)`` of the maps.

    Returns:
        ``cells [4, R]`` long row-major cell indices ``row * w + col`` (top-left, top-right,
        bottom-left, bottom-right) and ``weights [4, R]`` float32 summing to 1.
    """
    h, w = grid
    sizes = torch.as_tensor(image_size, dtype=torch.float64, device=xy.device).expand(xy.shape[0], 2)
    xy = xy.double()
    gx = (xy[:, 0] / sizes[:, 1] * w - 0.5).clamp(0, w - 1)
    gy = (xy[:, 1] / sizes[:, 0] * h - 0.5).clamp(0, h - 1)
    x0, y0 = gx.floor().long().clamp(max=w - 1), gy.floor().long().clamp(max=h - 1)
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    fx, fy = (gx - x0).float(), (gy - y0).float()
    cells = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy])
    return cells, weights


def resize_map(values: torch.Tensor, size: Size) -> torch.Tensor:
    """Resample a map spanning an image to another grid over the same image.

    Args:
        values: ``[h, w, D]`` (channels last) or ``[h, w]``.
        size: ``(h', w')`` of the result (e.g. the image ``(H, W)`` to upsample to, or a feature grid).

    Returns:
        ``[h', w', D]`` or ``[h', w']`` (float32 for integer input): bilinear with the module's
        cell-centre mapping; antialiased (a triangle filter as wide as a target cell) when a side shrinks.
    """
    size = (int(size[0]), int(size[1]))
    plain = values.ndim == 2
    x = (values[..., None] if plain else values).permute(2, 0, 1)[None]
    if not x.is_floating_point():
        x = x.float()
    if tuple(x.shape[-2:]) != size:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    out = x[0].permute(1, 2, 0)
    return out[..., 0] if plain else out


def grid_for_long_side(image_size: Size, long_side: float) -> Size:
    """Grid ``(h, w)`` with ``round(long_side)`` cells along the image's longer side, aspect ratio kept.

    Each side is rounded to the nearest whole cell (at least one). ``long_side`` may be fractional
    (a pixel size divided by the patch size, see :func:`input_size_for`).
    """
    if not long_side >= 1:
        raise ValueError(f"a feature grid needs at least one cell along the long side, got {long_side}")
    h, w = image_size
    longest = max(h, w)
    return max(1, int(round(h * long_side / longest))), max(1, int(round(w * long_side / longest)))


def input_size_for(image_size: Size, long_side: int, patch_size: int) -> Size:
    """``(H, W)`` in pixels with the long side ~``long_side`` px, both multiples of ``patch_size``, aspect kept.

    The patch grid is :func:`grid_for_long_side` of ``long_side / patch_size`` cells.
    """
    if long_side < patch_size:
        raise ValueError(f"image long side {long_side} is smaller than one {patch_size}px patch")
    h, w = grid_for_long_side(image_size, long_side / patch_size)
    return h * patch_size, w * patch_size


def floor_to_patch(image_size: Size, patch_size: int) -> Size:
    """The largest ``(H, W)`` not above ``image_size`` that is a multiple of ``patch_size`` (0 if smaller)."""
    h, w = image_size
    return (h // patch_size) * patch_size, (w // patch_size) * patch_size
