"""Front-to-back compositing of projected Gaussians: a dense reference and the fast tile compositor.

:func:`composite_reference` evaluates every pixel against every visible Gaussian (obviously correct,
slow); :func:`composite_tiles` gives the same result from three steps, as gsplat separates
``isect_tiles`` from ``rasterize_to_pixels``: binning into blocks (:func:`bin_blocks`), per-pixel
selection of the contributing Gaussians without autograd (:func:`select_contributions`), and
compositing of only those with autograd (:func:`composite_lists`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .projection import ALPHA_MAX, ALPHA_MIN, T_MIN, Projection, block_bounds, tile_bounds

__all__ = ["composite_reference", "composite_tiles", "bin_blocks", "select_contributions", "composite_lists",
           "Contributions"]


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


def bin_blocks(proj: Projection, width: int, height: int, tile_size: int, block_size: int,
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


class Contributions(NamedTuple):
    """Per-pixel lists of the Gaussians that contribute, front to back (the output of :func:`select_contributions`).

    Attributes:
        pixels: ``[M]`` flat pixel index ``row * W + col`` of each entry.
        slots: ``[M]`` the entry's position in its pixel's list (0 = front).
        gaussians: ``[M]`` Gaussian id.
        max_count: the longest list before ``max_per_pixel`` (0 when nothing contributes).
        n_truncated_pixel: contributions dropped by ``max_per_pixel``.
    """

    pixels: Tensor
    slots: Tensor
    gaussians: Tensor
    max_count: int
    n_truncated_pixel: int


def _block_pixels(width: int, height: int, block_size: int, device: torch.device) -> Tuple[Tensor, Tensor]:
    """Pixel centres of every block ``[B, P, 2]`` and their flat image index ``[B, P]`` (-1 outside the image)."""
    block_width, block_height = math.ceil(width / block_size), math.ceil(height / block_size)
    ty, tx = torch.meshgrid(torch.arange(block_height, device=device), torch.arange(block_width, device=device),
                            indexing="ij")
    iy, ix = torch.meshgrid(torch.arange(block_size, device=device), torch.arange(block_size, device=device),
                            indexing="ij")
    pix_x = tx.reshape(-1, 1) * block_size + ix.reshape(1, -1)
    pix_y = ty.reshape(-1, 1) * block_size + iy.reshape(1, -1)
    block_pix = torch.stack([pix_x, pix_y], -1).float() + 0.5
    pix_flat = torch.where((pix_x < width) & (pix_y < height), pix_y * width + pix_x, -1)
    return block_pix, pix_flat


@torch.no_grad()
def select_contributions(proj: Projection, table: Tensor, counts: Tensor, width: int, height: int, block_size: int,
                         max_per_pixel: Optional[int] = None, chunk_elements: int = 1 << 22) -> Contributions:
    """For every pixel, the depth-ordered list of Gaussians that contribute (no autograd).

    A Gaussian contributes to a pixel when its alpha there is >= 1/255 and it comes before gsplat's
    transmittance stop. Blocks are processed in chunks of similar candidate counts as dense
    ``[blocks, pixels, K]`` problems (at most 2x padding, ``chunk_elements`` bounds the memory).

    Args:
        proj: from :func:`~mvfm_nerfstudio.splatting.projection.project_gaussians`.
        table, counts: :func:`bin_blocks`' front-to-back candidates per block and their counts.
        max_per_pixel: keep each pixel's first K contributions (None = all).
    """
    device = table.device
    n_pix = block_size * block_size
    block_pix, pix_flat = _block_pixels(width, height, block_size, device)
    means2d = proj.means2d[0]
    kept_counts = counts.clamp_max(table.shape[1])
    active = torch.nonzero(kept_counts > 0).squeeze(-1)
    active = active[torch.argsort(kept_counts[active], descending=True)]  # similar counts share a chunk
    rows: List[Tensor] = []
    slots: List[Tensor] = []
    gids: List[Tensor] = []
    n_truncated_pixel, max_count = 0, 0
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
    empty = torch.zeros(0, dtype=torch.long, device=device)
    cat = lambda xs: torch.cat(xs) if xs else empty  # noqa: E731
    return Contributions(cat(rows), cat(slots), cat(gids), max_count, n_truncated_pixel)


def composite_lists(proj: Projection, colors: Tensor, lists: Contributions, width: int, height: int,
                    max_per_pixel: Optional[int] = None, absgrad: bool = False) -> Tuple[Tensor, Tensor]:
    """Composite each pixel's list front to back (autograd): ``render [H*W, C]`` and transmittance ``[H*W, 1]``.

    Skipped Gaussians leave the transmittance unchanged, so compositing only the contributing ones
    reproduces the full front-to-back composite. Pixels are processed in buckets of similar list length
    (powers of two), so little work goes into padding.
    """
    device = colors.device
    n_ch = colors.shape[-1]
    render = colors.new_zeros(height * width, n_ch)
    trans = colors.new_ones(height * width, 1)
    if absgrad:
        proj.means2d.absgrad = torch.zeros_like(proj.means2d.detach())
    if lists.max_count == 0:
        return render, trans
    k = lists.max_count if max_per_pixel is None else max(1, min(int(max_per_pixel), lists.max_count))
    means2d = proj.means2d[0]
    rows_t, slots_t, gids_t = lists.pixels, lists.slots, lists.gaussians
    count = torch.bincount(rows_t, minlength=height * width)
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
    return render.index_copy(0, pix_ids, torch.cat(r_all)), trans.index_copy(0, pix_ids, torch.cat(t_all))


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

    1. *Binning* (:func:`bin_blocks`): (block, Gaussian) intersections over ``block_size`` blocks,
       restricted to where the Gaussian can contribute (:func:`~mvfm_nerfstudio.splatting.projection.block_bounds`:
       gsplat's ``tile_size`` support, opacity-tightened), sorted by block then depth; optionally only the
       front ``max_per_block`` per block are kept.
    2. *Selection* (:func:`select_contributions`, no autograd): for every pixel, the depth-ordered list of
       Gaussians that actually contribute (alpha >= 1/255, before the transmittance stop), optionally cut
       to the first ``max_per_pixel``.
    3. *Compositing* (:func:`composite_lists`, autograd): each pixel composites only its list.

    With both limits None the result equals :func:`composite_reference` (and gsplat's CUDA rasteriser with
    the same ``tile_size``). A limit drops Gaussians behind the first K; a pixel's error is then at most
    its remaining transmittance ``1 - alpha`` times the largest colour magnitude. ``max_per_pixel`` is the
    cheaper and far more accurate limit (a pixel sees fewer Gaussians than its block); ``max_per_block``
    bounds the selection step's cost.

    Args:
        proj: from :func:`~mvfm_nerfstudio.splatting.projection.project_gaussians`. colors: ``[N, C]``.
            background: ``[C]`` or None.
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
    table, counts, n_truncated = bin_blocks(proj, width, height, tile_size, block_size, max_per_block)
    lists = select_contributions(proj, table, counts, width, height, block_size, max_per_pixel, chunk_elements)
    render, trans = composite_lists(proj, colors, lists, width, height, max_per_pixel, absgrad)
    render, alpha = _finish(render, trans, background)
    stats = {"n_truncated_block": n_truncated, "max_per_block_count": int(counts.max()),
             "n_truncated_pixel": lists.n_truncated_pixel, "max_per_pixel_count": lists.max_count}
    return render.reshape(height, width, colors.shape[-1]), alpha.reshape(height, width, 1), stats
