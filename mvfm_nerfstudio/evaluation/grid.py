"""Feature-grid coordinate conventions shared by the training losses and the evaluation metrics.

One convention everywhere (it is the core's pixel-centre convention carried to the
feature grid, i.e. ``grid_sample(..., align_corners=False)``):

* An image is ``H x W`` pixels and its feature map ``h x w`` cells, ``H = p*h``, ``W = p*w``.
* Pixel coordinates ``(u, v)``: ``u`` along the width, ``v`` along the height; the top-left
  corner of the image is ``(0, 0)`` and the centre of pixel ``(row i, col j)`` is
  ``(j + 0.5, i + 0.5)`` (COLMAP / OpenCV-with-centres).
* Normalised coordinates ``(x, y)`` in ``[-1, 1]``: ``x = 2u/W - 1``, ``y = 2v/H - 1``; ``-1`` is the
  left/top image *edge*, ``+1`` the right/bottom edge.
* Feature cell ``(row r, col c)`` covers pixels ``[c*p, (c+1)*p) x [r*p, (r+1)*p)``; its centre is
  at pixel ``((c + 0.5) p, (r + 0.5) p)``, i.e. normalised ``x = (2c + 1)/w - 1``.

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
]


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
