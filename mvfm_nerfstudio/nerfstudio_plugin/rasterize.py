"""Gaussian-splat rasterisation with gsplat's conventions: CUDA (gsplat) or pure PyTorch (CPU).

One functional entry point, :func:`rasterize`, renders any number of channels per Gaussian
(RGB, latent features and optionally depth are rendered in ONE pass by concatenating
channels). Backends:

* ``"gsplat"``: :func:`gsplat.rasterization` (CUDA kernels; needs a GPU).
* ``"torch"``: gsplat's PyTorch reference *projection* (``_fully_fused_projection``, works on
  CPU) followed by our own vectorised tile compositor :func:`composite_tiles`; autograd
  gives the backward pass.
* ``"auto"``: ``"gsplat"`` for CUDA tensors, ``"torch"`` otherwise.

:func:`composite_reference` is a dense, obviously-correct compositor (every pixel against
every Gaussian, sorted by depth) used by the tests and the benchmark to check the fast path.

Conventions (identical to gsplat 1.4 ``rasterize_mode="classic"``, ``packed=False``):

* ``viewmat`` is world-to-camera ``[4, 4]`` in the OpenCV camera frame (x right, y down,
  z forward); ``K`` is ``[3, 3]`` in pixels; pixel ``(row i, col j)`` is sampled at its centre
  ``(u, v) = (j + 0.5, i + 0.5)``.
* Projection: EWA splatting with a ``eps2d`` (0.3 px²) screen-space blur; Gaussians with
  depth outside ``(near_plane, far_plane)`` or with ``radius <= radius_clip`` are culled;
  ``radius = ceil(3 * sqrt(largest eigenvalue of the 2D covariance))``.
* Support: a Gaussian is evaluated at every pixel of every ``tile_size`` tile its
  ``[mean - radius, mean + radius]`` box overlaps (gsplat's tile binning) and nowhere else.
* Per pixel, front to back (ties in depth broken by Gaussian index):
  ``sigma = 0.5 * (a dx² + c dy²) + b dx dy`` with the conic ``(a, b, c)``,
  ``alpha = min(0.999, opacity * exp(-sigma))``; a Gaussian is skipped when ``sigma < 0`` or
  ``alpha < 1/255``; compositing stops *before* the Gaussian that would take the
  transmittance ``T`` to ``<= 1e-4``. ``render = sum_k alpha_k T_k c_k (+ T background)``,
  ``alpha_out = 1 - T``. Expected depth (``render_depth=True``) is the composited z-depth
  divided by ``alpha_out``, like gsplat's ``"RGB+ED"``.

How the PyTorch path works and where it deviates from gsplat CUDA (:func:`composite_tiles`):

* It bins into ``block_size`` blocks (8 px; gsplat's 16 px ``tile_size`` still defines the
  support) restricted to where a Gaussian's alpha can reach 1/255, selects per pixel the
  Gaussians that contribute (no autograd) and composites only those (autograd). With
  ``max_per_pixel=None`` and ``max_per_block=None`` the result equals the dense reference,
  which follows gsplat's CUDA kernels rule by rule (summation order differs; the direct
  comparison, ``tests/test_rasterize.py::test_torch_backend_matches_gsplat_cuda``, runs only
  on a GPU).
* ``max_per_pixel`` (K, default 256) keeps each pixel's first K contributing Gaussians;
  ``max_per_block`` keeps the front K candidates per block. Either can drop Gaussians behind
  the first K: a pixel's error is then at most its remaining transmittance ``1 - alpha_out``
  times the largest colour magnitude; dropped Gaussians get no gradient from that pixel
  (``meta["n_truncated_pixel"]`` / ``meta["n_truncated_block"]`` count the drops).
* ``absgrad`` is supported (``meta["means2d"].absgrad`` after backward: the sum over pixels
  of ``|dL/d means2d|`` per pixel, as gsplat's); ``antialiased`` multiplies opacities by
  gsplat's compensation factor, as gsplat does. Packed mode, batched cameras, distributed
  rendering and non-pinhole cameras are not implemented.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "Projection",
    "project_gaussians",
    "tile_bounds",
    "block_bounds",
    "composite_reference",
    "composite_tiles",
    "rasterize",
    "sh_colors",
    "ALPHA_MAX",
    "ALPHA_MIN",
    "T_MIN",
]

ALPHA_MAX = 0.999
"""Upper clamp of a Gaussian's alpha at a pixel (gsplat)."""
ALPHA_MIN = 1.0 / 255.0
"""Gaussians with a smaller alpha at a pixel are skipped (gsplat)."""
T_MIN = 1e-4
"""Compositing stops before the transmittance would reach this value (gsplat)."""

Backend = Literal["auto", "gsplat", "torch"]


class Projection(NamedTuple):
    """Screen-space Gaussians of one camera (outputs of :func:`project_gaussians`).

    Attributes:
        means2d: ``[1, N, 2]`` pixel coordinates of the projected means (non-leaf: call
            ``retain_grad()`` on it to read screen-space gradients, as the densification does).
        conics: ``[N, 3]`` upper triangle ``(a, b, c)`` of the inverse 2D covariance.
        depths: ``[N]`` camera-space z.
        radii: ``[N]`` int32 pixel radius; 0 for culled Gaussians.
        opacities: ``[N]`` opacities (times the antialiasing compensation if enabled).
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    opacities: Tensor


def _check_inputs(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmat: Tensor, K: Tensor) -> None:
    n = means.shape[0]
    expected = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
                "opacities": (opacities, (n,)), "viewmat": (viewmat, (4, 4)), "K": (K, (3, 3))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"rasterize: {name} must have shape {list(shape)}, got {list(t.shape)}")


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    antialiased: bool = False,
) -> Projection:
    """Project 3D Gaussians to one pinhole camera with gsplat's PyTorch reference (CPU or GPU).

    Args:
        means: ``[N, 3]`` world positions. quats: ``[N, 4]`` (w, x, y, z), normalised here.
        scales: ``[N, 3]`` standard deviations (activated, not log). opacities: ``[N]`` in [0, 1].
        viewmat: ``[4, 4]`` world-to-camera, OpenCV. K: ``[3, 3]`` pixels.
        width, height: image size in pixels.
    """
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    _check_inputs(means, quats, scales, opacities, viewmat, K)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, calc_compensations=antialiased,
    )
    radii = radii[0]
    if radius_clip > 0:
        radii = torch.where(radii.float() <= radius_clip, torch.zeros_like(radii), radii)
    opac = opacities * comp[0] if antialiased else opacities
    return Projection(means2d, conics[0], depths[0], radii.to(torch.int32), opac)


def tile_bounds(means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int) -> Tuple[Tensor, Tensor]:
    """Tile rectangle each Gaussian overlaps, exactly as gsplat's ``isect_tiles``.

    Args:
        means2d: ``[N, 2]`` pixel coordinates. radii: ``[N]`` pixel radii (0 = culled).
    Returns:
        ``tile_min [N, 2]`` (inclusive) and ``tile_max [N, 2]`` (exclusive), (x, y) tile indices;
        empty (min == max) for culled Gaussians.
    """
    tile_m = means2d.detach() / tile_size  # the same float expressions as gsplat's kernel
    tile_r = (radii.to(tile_m.dtype) / tile_size)[:, None]
    upper = torch.tensor([tile_width, tile_height], device=tile_m.device)
    tmin = torch.minimum(torch.floor(tile_m - tile_r).clamp_min(0).long(), upper)
    tmax = torch.minimum(torch.ceil(tile_m + tile_r).clamp_min(0).long(), upper)
    tmax = torch.where((radii > 0)[:, None], tmax, tmin)
    return tmin, tmax


def block_bounds(proj: Projection, width: int, height: int, tile_size: int, block_size: int) -> Tuple[Tensor, Tensor]:
    """Blocks (``block_size`` pixels, dividing ``tile_size``) where a Gaussian can contribute.

    The intersection of (1) gsplat's support, the pixels of the ``tile_size`` tiles its radius
    box overlaps (:func:`tile_bounds`), and (2) the bounding box of the ellipse outside which
    ``opacity * exp(-sigma) < 1/255``, where gsplat skips it anyway: ``sigma >= ln(255 opacity)``
    there, so the ellipse ``d^T Sigma^-1 d <= 2 ln(255 opacity)`` has half-extents
    ``sqrt(2 ln(255 opacity) Sigma_xx)`` and ``sqrt(.. Sigma_yy)``. Compositing over these blocks
    gives gsplat's result while evaluating far fewer (pixel, Gaussian) pairs.

    Returns:
        ``block_min [N, 2]`` (inclusive), ``block_max [N, 2]`` (exclusive), (x, y) block indices.
    """
    if tile_size % block_size:
        raise ValueError(f"block_size ({block_size}) must divide tile_size ({tile_size})")
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tmin, tmax = tile_bounds(proj.means2d[0], proj.radii, tile_size, tile_width, tile_height)
    ratio = tile_size // block_size
    m = proj.means2d[0].detach()
    a, b, c = proj.conics.detach().unbind(-1)
    det = (a * c - b * b).clamp_min(1e-12)
    opac = proj.opacities.detach()
    level = 2 * torch.log(255.0 * opac.clamp_min(1e-12)).clamp_min(0)
    ext = torch.sqrt(level[:, None] * torch.stack([c / det, a / det], -1)) * (1 + 1e-3) + 1e-2  # float margin
    upper = torch.tensor([math.ceil(width / block_size), math.ceil(height / block_size)], device=m.device)
    bmin = torch.maximum(tmin * ratio, torch.floor((m - ext) / block_size).clamp_min(0).long())
    bmax = torch.minimum(torch.minimum(tmax * ratio, upper), torch.ceil((m + ext) / block_size).clamp_min(0).long())
    alive = (proj.radii > 0) & (opac >= ALPHA_MIN)
    bmin = torch.minimum(bmin, upper)
    bmax = torch.where(alive[:, None], torch.maximum(bmax, bmin), bmin)
    return bmin, bmax


def _gaussian_alpha(pix: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
    """Alpha of Gaussians at pixels, zero where gsplat skips them.

    Args:
        pix: ``[..., P, 2]`` pixel centres. means2d: ``[..., G, 2]``. conics: ``[..., G, 3]``.
        opacities: ``[..., G]``.
    Returns:
        ``alpha [..., P, G]`` (clamped at :data:`ALPHA_MAX`, zero where skipped) and the
        offsets ``(dx, dy)``, each ``[..., P, G]`` (pixel minus mean; absgrad hooks read them).
    """
    dx = pix[..., :, 0:1] - means2d[..., 0].unsqueeze(-2)
    dy = pix[..., :, 1:2] - means2d[..., 1].unsqueeze(-2)
    a, b, c = (conics[..., i].unsqueeze(-2) for i in range(3))
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    # sigma < 0 (non-PD conic) is skipped; clamping keeps exp finite so masked gradients stay 0, not NaN
    alpha = torch.clamp_max(opacities.unsqueeze(-2) * torch.exp(-sigma.clamp_min(0)), ALPHA_MAX)
    keep = (sigma >= 0) & (alpha >= ALPHA_MIN)
    return torch.where(keep, alpha, torch.zeros_like(alpha)), (dx, dy)


def _candidates(pix: Tensor, pix_valid: Tensor, ids: Tensor, ids_c: Tensor, means2d: Tensor, conics: Tensor,
                opacities: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(block, pixel, slot) triples where a block's Gaussian may reach alpha >= 1/255 at a pixel.

    ``opacity * exp(-sigma) >= 1/255`` <=> ``sigma <= ln(255 opacity)``: tested without ``exp``,
    with a margin so the set is a superset of gsplat's (the compositing pass re-tests exactly).

    Args:
        pix: ``[b, P, 2]`` pixel centres; pix_valid: ``[b, P]``; ids: ``[b, K]`` (-1 = empty);
        ids_c: ``ids`` clamped to >= 0.
    Returns:
        ``bi, pi, ki`` (row-major: grouped by pixel, front to back) and the Gaussian ids ``g``.
    """
    m = means2d[ids_c]  # [b, K, 2]
    c = conics[ids_c]  # [b, K, 3]
    limit = torch.where(ids >= 0, torch.log(255.0 * opacities[ids_c].clamp_min(1e-30)) + 1e-3,
                        torch.full((), -1.0, device=ids.device))
    dx = pix[..., 0:1] - m[:, None, :, 0]
    dy = pix[..., 1:2] - m[:, None, :, 1]
    sigma = 0.5 * (c[:, None, :, 0] * dx * dx + c[:, None, :, 2] * dy * dy) + c[:, None, :, 1] * dx * dy
    keep = (sigma >= 0) & (sigma <= limit[:, None, :]) & pix_valid[..., None]
    bi, pi, ki = torch.nonzero(keep, as_tuple=True)
    return bi, pi, ki, ids_c[bi, ki]


def _alpha_at(pix: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor) -> Tensor:
    """Alpha (gsplat's formula, 0 where skipped) of single (pixel ``[M, 2]``, Gaussian) pairs -> ``[M]``."""
    alpha, _ = _gaussian_alpha(pix[:, None], means2d[:, None], conics[:, None], opacities[:, None])
    return alpha[:, 0, 0]


def _composite_weights(alpha: Tensor) -> Tuple[Tensor, Tensor]:
    """Front-to-back compositing weights with gsplat's early stop.

    Args:
        alpha: ``[..., G]`` per-pixel alphas, Gaussians sorted front to back (0 = skipped).
    Returns:
        ``weights [..., G]`` (``alpha_k T_k``; zero after the stop) and the final transmittance
        ``T [..., 1]``; a pixel's value is ``sum_k weights_k c_k (+ T background)``.
    """
    with torch.no_grad():
        # gsplat stops *before* the Gaussian whose next transmittance would be <= T_MIN;
        # the inclusive product is non-increasing so every later Gaussian is excluded too.
        included = torch.cumprod(1.0 - alpha, dim=-1) > T_MIN
    alpha = torch.where(included, alpha, torch.zeros_like(alpha))
    trans = torch.cumprod(1.0 - alpha, dim=-1)  # inclusive: T after each Gaussian
    t_before = torch.cat([torch.ones_like(trans[..., :1]), trans[..., :-1]], dim=-1)
    return alpha * t_before, trans[..., -1:]


def _pixel_tiles(width: int, height: int, tile_size: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Pixel centres ``[H*W, 2]`` (row-major) and their tile id ``[H*W]``."""
    tile_width = math.ceil(width / tile_size)
    ys, xs = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 2).float() + 0.5
    tile = (ys // tile_size) * tile_width + (xs // tile_size)
    return pix, tile.reshape(-1)


def _finish(render: Tensor, trans: Tensor, background: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    if background is not None:
        render = render + trans * background.to(render)
    return render, 1.0 - trans


def composite_reference(
    proj: Projection,
    colors: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
    background: Optional[Tensor] = None,
    pixel_chunk: int = 4096,
) -> Tuple[Tensor, Tensor]:
    """Dense reference compositor: every pixel against every visible Gaussian, depth sorted.

    ``tile_size`` only reproduces gsplat's support rule (a Gaussian reaches the pixels of the
    tiles its radius box overlaps). Memory is ``pixel_chunk x N`` per intermediate.

    Args:
        proj: from :func:`project_gaussians`. colors: ``[N, C]``. background: ``[C]`` or None.
    Returns:
        ``render [H, W, C]``, ``alpha [H, W, 1]``.
    """
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    means2d = proj.means2d[0]
    vis = torch.nonzero(proj.radii > 0).squeeze(-1)
    vis = vis[torch.argsort(proj.depths.detach()[vis], stable=True)]
    tmin, tmax = tile_bounds(means2d[vis], proj.radii[vis], tile_size, tile_width, tile_height)
    pix, ptile = _pixel_tiles(width, height, tile_size, colors.device)
    px, py = ptile % tile_width, ptile // tile_width
    renders, transes = [], []
    for start in range(0, pix.shape[0], pixel_chunk):
        sl = slice(start, start + pixel_chunk)
        alpha, _ = _gaussian_alpha(pix[sl], means2d[vis], proj.conics[vis], proj.opacities[vis])
        inside = ((px[sl, None] >= tmin[None, :, 0]) & (px[sl, None] < tmax[None, :, 0])
                  & (py[sl, None] >= tmin[None, :, 1]) & (py[sl, None] < tmax[None, :, 1]))
        alpha = torch.where(inside, alpha, torch.zeros_like(alpha))
        weights, t = _composite_weights(alpha)
        renders.append(weights @ colors[vis])
        transes.append(t)
    render, alpha = _finish(torch.cat(renders), torch.cat(transes), background)
    return render.reshape(height, width, -1), alpha.reshape(height, width, 1)


def _bin_blocks(proj: Projection, width: int, height: int, tile_size: int, block_size: int,
                max_per_block: Optional[int]):
    """Sort (block, Gaussian) intersections by block then depth and keep the front K per block.

    Returns:
        ``table [B, K]`` Gaussian ids (front to back; -1 = empty slot), the per-block counts
        ``[B]`` before truncation, and the number of dropped intersections.
    """
    device = proj.radii.device
    tile_width = math.ceil(width / block_size)
    n_tiles = tile_width * math.ceil(height / block_size)
    tmin, tmax = block_bounds(proj, width, height, tile_size, block_size)
    size = tmax - tmin  # [N, 2]
    n_per = size[:, 0] * size[:, 1]
    gid = torch.repeat_interleave(torch.arange(len(n_per), device=device), n_per)
    if gid.numel() == 0:
        return torch.full((n_tiles, 1), -1, dtype=torch.long, device=device), torch.zeros(n_tiles, dtype=torch.long, device=device), 0
    first = torch.cumsum(n_per, 0) - n_per
    local = torch.arange(gid.numel(), device=device) - first[gid]
    w = size[gid, 0]
    tile = (tmin[gid, 1] + local // w) * tile_width + tmin[gid, 0] + local % w
    rank = torch.empty(len(n_per), dtype=torch.long, device=device)
    rank[torch.argsort(proj.depths.detach(), stable=True)] = torch.arange(len(n_per), device=device)
    order = torch.argsort(tile * len(n_per) + rank[gid])
    gid, tile = gid[order], tile[order]
    counts = torch.bincount(tile, minlength=n_tiles)
    pos = torch.arange(gid.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[tile]
    k = int(counts.max()) if max_per_block is None else max(1, min(int(max_per_block), int(counts.max())))
    keep = pos < k
    table = torch.full((n_tiles, k), -1, dtype=torch.long, device=device)
    table[tile[keep], pos[keep]] = gid[keep]
    return table, counts, int((~keep).sum())


def _absgrad_hook(target: Tensor, ids: Tensor):
    """Backward hook adding ``|grad|`` of per-(pixel, Gaussian) offsets into ``target[ids]`` (returns None: the
    gradient itself is unchanged)."""

    def hook(grad: Tensor) -> None:
        target.index_add_(0, ids, grad.abs().reshape(-1))

    return hook


def composite_tiles(
    proj: Projection,
    colors: Tensor,
    width: int,
    height: int,
    tile_size: int = 16,
    block_size: int = 8,
    max_per_block: Optional[int] = None,
    max_per_pixel: Optional[int] = None,
    background: Optional[Tensor] = None,
    absgrad: bool = False,
    chunk_elements: int = 1 << 22,
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Fast vectorised tile compositor in three steps (PyTorch autograd backward).

    1. *Binning*: (block, Gaussian) intersections over ``block_size`` blocks, restricted to
       where the Gaussian can contribute (:func:`block_bounds`: gsplat's ``tile_size``
       support, opacity-tightened), sorted by block then depth; optionally only the front
       ``max_per_block`` per block are kept.
    2. *Selection* (no autograd; chunks of blocks with similar counts as dense
       ``[blocks, pixels, K]`` problems): for every pixel, the depth-ordered list of Gaussians
       that actually contribute (alpha >= 1/255, before the transmittance stop), optionally cut
       to the first ``max_per_pixel``.
    3. *Compositing* (autograd): each pixel composites only its list (``[pixels, K_pixel]``).

    Skipped Gaussians leave the transmittance unchanged, so step 3 reproduces the full
    front-to-back composite exactly: with both limits None the result equals
    :func:`composite_reference` (and gsplat's CUDA rasteriser with the same ``tile_size``). A
    limit drops Gaussians behind the first K; a pixel's error is then at most its remaining
    transmittance ``1 - alpha`` times the largest colour magnitude. ``max_per_pixel`` is the
    cheaper and far more accurate limit (a pixel sees fewer Gaussians than its block);
    ``max_per_block`` bounds the selection step's cost.

    Args:
        proj: from :func:`project_gaussians`. colors: ``[N, C]``. background: ``[C]`` or None.
        tile_size: gsplat's tile size (defines the support). block_size: binning granularity
            (divides ``tile_size``; smaller = fewer wasted pixel-Gaussian pairs, more intersections).
        max_per_block: front-K candidates per block (None = all).
        max_per_pixel: front-K contributing Gaussians per pixel (None = all).
        absgrad: accumulate ``proj.means2d.absgrad`` (``[1, N, 2]``) during backward.
        chunk_elements: bound on ``blocks x pixels x K`` per selection chunk (memory control).
    Returns:
        ``render [H, W, C]``, ``alpha [H, W, 1]`` and stats: ``n_truncated_block`` (intersections
        dropped by ``max_per_block``), ``n_truncated_pixel`` (contributions dropped by
        ``max_per_pixel``), ``max_per_block_count`` / ``max_per_pixel_count`` (largest counts
        before the limits).
    """
    device = colors.device
    table, counts, n_truncated = _bin_blocks(proj, width, height, tile_size, block_size, max_per_block)
    block_width, block_height = math.ceil(width / block_size), math.ceil(height / block_size)
    n_pix = block_size * block_size
    means2d = proj.means2d[0]

    # pixel centres of every block, [B, P, 2], and their flat image index (-1 outside the image)
    ty, tx = torch.meshgrid(torch.arange(block_height, device=device), torch.arange(block_width, device=device),
                            indexing="ij")
    iy, ix = torch.meshgrid(torch.arange(block_size, device=device), torch.arange(block_size, device=device),
                            indexing="ij")
    pix_x = tx.reshape(-1, 1) * block_size + ix.reshape(1, -1)
    pix_y = ty.reshape(-1, 1) * block_size + iy.reshape(1, -1)
    block_pix = torch.stack([pix_x, pix_y], -1).float() + 0.5
    pix_flat = torch.where((pix_x < width) & (pix_y < height), pix_y * width + pix_x, -1)

    # selection: per pixel, the Gaussians that contribute, front to back, as (pixel, slot, gaussian) triples
    kept_counts = counts.clamp_max(table.shape[1])
    active = torch.nonzero(kept_counts > 0).squeeze(-1)
    active = active[torch.argsort(kept_counts[active], descending=True)]  # similar counts share a chunk
    rows, slots, gids = [], [], []
    n_truncated_pixel, max_count = 0, 0
    with torch.no_grad():
        start = 0
        while start < active.numel():
            k_chunk = int(kept_counts[active[start]])
            blocks = active[start:start + max(1, chunk_elements // (n_pix * k_chunk))]
            blocks = blocks[kept_counts[blocks] * 2 > k_chunk]  # at most 2x padding (counts are sorted)
            start += blocks.numel()
            ids = table[blocks, :k_chunk]  # [b, K]
            ids_c = ids.clamp_min(0)
            pix = pix_flat[blocks]  # [b, P]
            bi, pi, ki, g = _candidates(block_pix[blocks], pix >= 0, ids, ids_c, means2d, proj.conics, proj.opacities)
            if bi.numel() == 0:
                continue
            # early stop: exclusive log-transmittance per (pixel, candidate), segments = pixels (entries are grouped
            # by pixel, front to back); float64 sums and a small margin keep a superset of gsplat's list
            alpha = _alpha_at(block_pix[blocks][bi, pi], means2d[g], proj.conics[g], proj.opacities[g])
            log_keep = torch.log1p(-alpha.double())
            csum = torch.cumsum(log_keep, 0)
            new_seg = torch.ones_like(bi, dtype=torch.bool)
            new_seg[1:] = (bi[1:] != bi[:-1]) | (pi[1:] != pi[:-1])
            first = torch.nonzero(new_seg).squeeze(-1)
            seg = torch.cumsum(new_seg, 0) - 1
            log_after = csum - (csum[first] - log_keep[first])[seg]
            contrib = log_after > math.log(T_MIN) - 1e-4
            rank = torch.arange(bi.numel(), device=device) - first[seg]
            if contrib.any():
                max_count = max(max_count, int(rank[contrib].max()) + 1)
            if max_per_pixel is not None:
                sel = contrib & (rank < max_per_pixel)
                n_truncated_pixel += int(contrib.sum() - sel.sum())
                contrib = sel
            rows.append(pix[bi[contrib], pi[contrib]])
            slots.append(rank[contrib])
            gids.append(g[contrib])
    k = max_count if max_per_pixel is None else max(1, min(int(max_per_pixel), max_count))
    n_ch = colors.shape[-1]
    render = colors.new_zeros(height * width, n_ch)
    trans = colors.new_ones(height * width, 1)
    if absgrad:
        proj.means2d.absgrad = torch.zeros_like(proj.means2d.detach())
    if max_count > 0:
        rows_t, slots_t, gids_t = torch.cat(rows), torch.cat(slots), torch.cat(gids)
        count = torch.bincount(rows_t, minlength=height * width)
        # pixels in buckets of similar list length (powers of two) so little work goes into padding
        bucket = torch.ceil(torch.log2(count.clamp_min(1).float())).long()
        pix_all, r_all, t_all = [], [], []
        for b in torch.unique(bucket[count > 0]).tolist():
            in_bucket = (bucket == b) & (count > 0)
            pix_ids = torch.nonzero(in_bucket).squeeze(-1)
            row_map = torch.cumsum(in_bucket, 0) - 1
            entries = in_bucket[rows_t]
            table_p = torch.full((pix_ids.numel(), min(k, 1 << b)), -1, dtype=torch.long, device=device)
            table_p[row_map[rows_t[entries]], slots_t[entries]] = gids_t[entries]
            pix_xy = torch.stack([pix_ids % width, pix_ids // width], -1).float()[:, None] + 0.5  # [p, 1, 2]
            ids_c = table_p.clamp_min(0)
            opac = torch.where(table_p >= 0, proj.opacities[ids_c], torch.zeros((), device=device, dtype=colors.dtype))
            alpha, delta = _gaussian_alpha(pix_xy, means2d[ids_c], proj.conics[ids_c], opac)  # [p, 1, k]
            if absgrad and delta[0].requires_grad:
                for axis, d in enumerate(delta):
                    d.register_hook(_absgrad_hook(proj.means2d.absgrad[0, :, axis], ids_c.reshape(-1)))
            weights, t = _composite_weights(alpha[:, 0])  # [p, k], [p, 1]
            pix_all.append(pix_ids)
            r_all.append(torch.bmm(weights[:, None], colors[ids_c])[:, 0])  # (faster here than embedding_bag)
            t_all.append(t)
        pix_ids = torch.cat(pix_all)
        render = render.index_copy(0, pix_ids, torch.cat(r_all))
        trans = trans.index_copy(0, pix_ids, torch.cat(t_all))
    render, alpha = _finish(render, trans, background)
    stats = {"n_truncated_block": n_truncated, "max_per_block_count": int(counts.max()),
             "n_truncated_pixel": n_truncated_pixel, "max_per_pixel_count": max_count}
    return render.reshape(height, width, n_ch), alpha.reshape(height, width, 1), stats


def sh_colors(sh: Tensor, means: Tensor, viewmat: Tensor, degree: int) -> Tensor:
    """RGB from spherical-harmonic coefficients seen from a camera, as gsplat's rasterization.

    Args:
        sh: ``[N, K, 3]`` coefficients. means: ``[N, 3]``. viewmat: ``[4, 4]`` world-to-camera.
        degree: SH degree to use (``(degree + 1)² <= K``).
    Returns:
        ``[N, 3]`` colours ``max(SH(dir) + 0.5, 0)``.
    """
    from gsplat.cuda._torch_impl import _spherical_harmonics

    cam_center = -viewmat[:3, :3].T @ viewmat[:3, 3]
    dirs = means - cam_center
    if sh.is_cuda:
        from gsplat import spherical_harmonics

        rgb = spherical_harmonics(degree, dirs, sh)
    else:
        rgb = _spherical_harmonics(degree, dirs, sh)
    return torch.clamp_min(rgb + 0.5, 0.0)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    antialiased: bool = False,
    render_depth: bool = False,
    background: Optional[Tensor] = None,
    tile_size: int = 16,
    block_size: int = 8,
    max_per_block: Optional[int] = None,
    max_per_pixel: Optional[int] = 256,
    absgrad: bool = False,
    backend: Backend = "auto",
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render ``colors`` (any channels: RGB, features, both concatenated) of 3D Gaussians.

    Args:
        means: ``[N, 3]`` world positions. quats: ``[N, 4]`` (w, x, y, z), any norm.
        scales: ``[N, 3]`` activated scales. opacities: ``[N]`` activated, in [0, 1].
        colors: ``[N, C]`` values to composite.
        viewmat: ``[4, 4]`` world-to-camera, OpenCV frame. K: ``[3, 3]`` in pixels.
        width, height: output size in pixels.
        near_plane, far_plane, eps2d, radius_clip: projection settings (gsplat's meanings).
        antialiased: gsplat's ``rasterize_mode="antialiased"`` (opacity compensation).
        render_depth: append expected z-depth as a last channel (``C + 1`` channels).
        background: ``[C]`` colour composited behind (depth channel gets 0), or None.
        tile_size: tile size in pixels (16 as gsplat; also defines the support).
        block_size, max_per_block, max_per_pixel: torch backend: binning block size and front-K
            truncations per block / per pixel (None: exact); see :func:`composite_tiles`.
        absgrad: fill ``meta["means2d"].absgrad`` in backward (for AbsGS densification).
        backend: ``"auto"`` (gsplat for CUDA tensors, torch otherwise), ``"gsplat"`` or ``"torch"``.

    Returns:
        ``render [H, W, C(+1)]``, ``alpha [H, W, 1]`` and ``meta``: gsplat-compatible info for
        densification (``means2d [1, N, 2]``, ``radii [1, N]``, ``depths [1, N]``, ``conics``,
        ``opacities``, ``width``, ``height``, ``n_cameras=1``, ``gaussian_ids=None``,
        ``tile_size``) plus ``backend`` and, for torch, the truncation stats of :func:`composite_tiles`.
    """
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if colors.ndim != 2 or colors.shape[0] != means.shape[0]:
        raise ValueError(f"rasterize: colors must be [N, C] with N={means.shape[0]}, got {list(colors.shape)}")
    if background is not None and background.shape != (colors.shape[1],):
        raise ValueError(f"rasterize: background must be [{colors.shape[1]}], got {list(background.shape)}")
    if backend == "gsplat":
        return _rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height, near_plane,
                                 far_plane, eps2d, radius_clip, antialiased, render_depth, background, tile_size,
                                 absgrad)
    if backend != "torch":
        raise ValueError(f"rasterize: unknown backend {backend!r}; use 'auto', 'gsplat' or 'torch'")

    proj = project_gaussians(means, quats, scales, opacities, viewmat, K, width, height, near_plane, far_plane,
                             eps2d, radius_clip, antialiased)
    if render_depth:
        colors = torch.cat([colors, proj.depths[:, None]], dim=-1)
        if background is not None:
            background = torch.cat([background, background.new_zeros(1)])
    render, alpha, stats = composite_tiles(proj, colors, width, height, tile_size, block_size, max_per_block,
                                           max_per_pixel, background, absgrad)
    if render_depth:
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp_min(1e-10)], dim=-1)
    meta = {
        "backend": "torch", "means2d": proj.means2d, "radii": proj.radii[None], "depths": proj.depths[None],
        "conics": proj.conics[None], "opacities": proj.opacities[None], "width": width, "height": height,
        "n_cameras": 1, "gaussian_ids": None, "camera_ids": None, "tile_size": tile_size, **stats,
    }
    return render, alpha, meta


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height, near_plane, far_plane,
                      eps2d, radius_clip, antialiased, render_depth, background, tile_size, absgrad):
    if not means.is_cuda:
        raise RuntimeError("rasterize: backend='gsplat' needs CUDA tensors (gsplat's rasteriser is CUDA-only); "
                           "use backend='torch' or 'auto' on CPU")
    from gsplat import rasterization

    render, alpha, meta = rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmat[None],
        Ks=K[None], width=width, height=height, near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip,
        eps2d=eps2d, packed=False, tile_size=tile_size, backgrounds=None if background is None else background[None],
        render_mode="RGB+ED" if render_depth else "RGB", absgrad=absgrad,
        rasterize_mode="antialiased" if antialiased else "classic",
    )
    meta["backend"] = "gsplat"
    return render[0], alpha[0], meta
