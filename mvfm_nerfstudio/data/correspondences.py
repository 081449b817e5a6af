"""Ground-truth 2D-2D correspondences between views of a :class:`PosedScene`.

Two sources:

* :func:`correspondences_from_tracks`: SfM tracks (a 3D point observed in several images);
  every pair of views observing the same point gives a correspondence (both directions).
* :func:`correspondences_from_depth`: dense ones from depth maps. A grid of source pixels
  is lifted with its depth, projected into every other view and kept only if it lands inside
  the image, in front of the camera, and the target's own depth there agrees within a
  relative tolerance (rejects occluded points and depth errors).

All coordinates are UNDISTORTED pixel coordinates of the ORIGINAL image size, consistent with
``PosedScene.intrinsics``, pixel-centre convention (top-left pixel centre = (0.5, 0.5)). Use
:meth:`Correspondences.scaled` for resized images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import SceneError
from ..geometry.cameras import project_points, unproject_pixels
from ..geometry.distortion import undistort_pixels
from .scene import IndexLike, PosedScene, Size, _as_index_list

__all__ = ["Correspondences", "correspondences_from_tracks", "correspondences_from_depth"]


@dataclass
class Correspondences:
    """Pixel correspondences within a set of S views.

    Attributes:
        src_view: ``[P]`` long, position 0..S-1 of the source view within ``view_indices``.
        dst_view: ``[P]`` long, position of the target view.
        src_xy: ``[P, 2]`` float32 pixel coordinates in the source view (original size, undistorted).
        dst_xy: ``[P, 2]`` float32 pixel coordinates in the target view.
        view_indices: ``[S]`` long scene indices of the views (what the positions refer to), or None.
        point_ids: ``[P]`` long track point id (tracks) or -1 (depth), or None.
    """

    src_view: torch.Tensor
    dst_view: torch.Tensor
    src_xy: torch.Tensor
    dst_xy: torch.Tensor
    view_indices: Optional[torch.Tensor] = None
    point_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.src_view.shape[0])

    @staticmethod
    def empty(view_indices: Optional[torch.Tensor] = None) -> "Correspondences":
        z = torch.zeros(0, dtype=torch.long)
        return Correspondences(z, z.clone(), torch.zeros(0, 2), torch.zeros(0, 2), view_indices, z.clone())

    def select(self, mask_or_index: torch.Tensor) -> "Correspondences":
        """Subset by boolean mask or index tensor ``[P]``."""
        return Correspondences(
            self.src_view[mask_or_index], self.dst_view[mask_or_index], self.src_xy[mask_or_index],
            self.dst_xy[mask_or_index], self.view_indices,
            None if self.point_ids is None else self.point_ids[mask_or_index],
        )

    def pair(self, src: int, dst: int) -> "Correspondences":
        """Only the correspondences from view position ``src`` to ``dst``."""
        return self.select((self.src_view == src) & (self.dst_view == dst))

    def pair_counts(self, num_views: Optional[int] = None) -> torch.Tensor:
        """``[S, S]`` long: number of correspondences from each view position to each other."""
        s = num_views if num_views is not None else (len(self.view_indices) if self.view_indices is not None else 0)
        if len(self):
            s = max(s, int(torch.maximum(self.src_view.max(), self.dst_view.max())) + 1)
        counts = torch.zeros(s * s, dtype=torch.long)
        counts.index_add_(0, self.src_view * s + self.dst_view, torch.ones(len(self), dtype=torch.long))
        return counts.view(s, s)

    def subsample(self, n: int, generator: Optional[torch.Generator] = None) -> "Correspondences":
        """At most ``n`` correspondences drawn uniformly without replacement (order kept)."""
        if len(self) <= n:
            return self
        perm = torch.randperm(len(self), generator=generator)[:n].sort().values
        return self.select(perm)

    def scaled(
        self, scene: PosedScene, view_indices: Optional[IndexLike] = None, size: Optional[Size] = None
    ) -> "Correspondences":
        """Coordinates in images resized to ``size = (H', W')`` (``u * W'/W, v * H'/H`` per view).

        ``view_indices`` (default: the stored ones) are the scene indices the positions refer to.
        """
        if size is None:
            raise SceneError("Correspondences.scaled needs size=(H, W)")
        if view_indices is None:
            if self.view_indices is None:
                raise SceneError("Correspondences.scaled needs view_indices (none stored)")
            view_indices = self.view_indices
        idx = _as_index_list(view_indices, len(scene), scene.name)
        factors = torch.tensor([scene.scale_factors(i, size) for i in idx], dtype=torch.float64)  # [S, 2]
        src = (self.src_xy.double() * factors[self.src_view]).to(self.src_xy.dtype)
        dst = (self.dst_xy.double() * factors[self.dst_view]).to(self.dst_xy.dtype)
        return Correspondences(self.src_view, self.dst_view, src, dst, torch.tensor(idx), self.point_ids)

    def to(self, device: Union[str, torch.device]) -> "Correspondences":
        return Correspondences(
            self.src_view.to(device), self.dst_view.to(device), self.src_xy.to(device), self.dst_xy.to(device),
            None if self.view_indices is None else self.view_indices.to(device),
            None if self.point_ids is None else self.point_ids.to(device),
        )

    @staticmethod
    def cat(items: Sequence["Correspondences"], view_indices: Optional[torch.Tensor] = None) -> "Correspondences":
        """Concatenate correspondences over the same view set."""
        if not items:
            return Correspondences.empty(view_indices)
        pids = [c.point_ids if c.point_ids is not None else torch.full((len(c),), -1) for c in items]
        return Correspondences(
            torch.cat([c.src_view for c in items]), torch.cat([c.dst_view for c in items]),
            torch.cat([c.src_xy for c in items]), torch.cat([c.dst_xy for c in items]),
            view_indices if view_indices is not None else items[0].view_indices, torch.cat(pids),
        )


def _check_view_set(scene: PosedScene, view_indices: IndexLike) -> List[int]:
    idx = _as_index_list(view_indices, len(scene), scene.name)
    if len(set(idx)) != len(idx):
        raise SceneError(f"view_indices {idx} contain duplicates")
    return idx


def _cap_pairs(
    src_view: torch.Tensor, dst_view: torch.Tensor, num_views: int, max_per_pair: Optional[int], seed: int
) -> torch.Tensor:
    """Indices keeping at most ``max_per_pair`` random entries per (src, dst) pair, in original order."""
    n = src_view.shape[0]
    if max_per_pair is None or n == 0:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    key = src_view * num_views + dst_view
    # rank each entry within its pair under a random order; keep ranks < max_per_pair
    perm = torch.randperm(n, generator=g)
    key_p = key[perm]
    order = torch.argsort(key_p, stable=True)
    sorted_key = key_p[order]
    start = torch.ones_like(sorted_key, dtype=torch.bool)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    group_start = torch.cummax(torch.where(start, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    rank = torch.arange(n) - group_start
    keep = perm[order[rank < max_per_pair]]
    return keep.sort().values


def correspondences_from_tracks(
    scene: PosedScene, view_indices: IndexLike, max_per_pair: Optional[int] = None, seed: int = 0
) -> Correspondences:
    """Correspondences between the given views from the scene's SfM tracks.

    Every 3D point observed in views ``a`` and ``b`` gives ``a -> b`` and ``b -> a``. Track
    pixels are undistorted into the pinhole images of ``scene.intrinsics``.

    Args:
        scene: a scene with ``tracks``.
        view_indices: S distinct scene view indices; output positions refer to this order.
        max_per_pair: keep at most this many (random, seeded) per ordered view pair.
        seed: random seed for ``max_per_pair``.
    """
    if scene.tracks is None:
        raise SceneError(f"scene {scene.name!r} has no tracks (add a COLMAP model or use correspondences_from_depth)")
    idx = _check_view_set(scene, view_indices)
    s = len(idx)
    vidx = torch.tensor(idx, dtype=torch.long)
    pos = torch.full((len(scene),), -1, dtype=torch.long)
    pos[vidx] = torch.arange(s)
    t = scene.tracks
    sel = (pos[t.image_ids] >= 0).nonzero().flatten()
    if len(sel) == 0:
        return Correspondences.empty(vidx)
    obs_pos = pos[t.image_ids[sel]]
    obs_pid = t.point_ids[sel]
    xy = t.xy[sel].double()
    if scene.distortion is not None:
        views = t.image_ids[sel]
        xy = undistort_pixels(xy, scene.intrinsics[views], scene.distortion[views])
    # one observation per (point, view): the first one
    uniq_pid, compact = torch.unique(obs_pid, return_inverse=True)
    key = (compact * s + obs_pos).numpy()
    _, first = np.unique(key, return_index=True)
    first = torch.from_numpy(first)
    table = torch.full((len(uniq_pid), s), -1, dtype=torch.long)
    table[compact[first], obs_pos[first]] = first
    src_v, dst_v, src_o, dst_o = [], [], [], []
    for a in range(s):
        for b in range(s):
            if a == b:
                continue
            both = (table[:, a] >= 0) & (table[:, b] >= 0)
            if not both.any():
                continue
            src_o.append(table[both, a])
            dst_o.append(table[both, b])
            src_v.append(torch.full((int(both.sum()),), a, dtype=torch.long))
            dst_v.append(torch.full((int(both.sum()),), b, dtype=torch.long))
    if not src_o:
        return Correspondences.empty(vidx)
    src_o, dst_o = torch.cat(src_o), torch.cat(dst_o)
    src_v, dst_v = torch.cat(src_v), torch.cat(dst_v)
    keep = _cap_pairs(src_v, dst_v, s, max_per_pair, seed)
    src_o, dst_o, src_v, dst_v = src_o[keep], dst_o[keep], src_v[keep], dst_v[keep]
    return Correspondences(
        src_view=src_v, dst_view=dst_v, src_xy=xy[src_o].float(), dst_xy=xy[dst_o].float(),
        view_indices=vidx, point_ids=obs_pid[src_o],
    )


def _sample_depths(
    flat: torch.Tensor, offsets: torch.Tensor, sizes: torch.Tensor, view: torch.Tensor, xy: torch.Tensor
) -> torch.Tensor:
    """Sample depth maps stored flattened in ``flat`` (map ``k`` starts at ``offsets[k]``, size
    ``sizes[k] = (H, W)``) for points ``xy [P, 2]`` of maps ``view [P]`` (points inside their image).

    Bilinear between the four surrounding pixel centres when all are valid, otherwise the
    nearest pixel (NaN when that is invalid too).
    """
    h, w = sizes[view, 0], sizes[view, 1]
    base = offsets[view]
    u = torch.minimum(torch.maximum(xy[:, 0] - 0.5, torch.zeros_like(xy[:, 0])), (w - 1).double())
    v = torch.minimum(torch.maximum(xy[:, 1] - 0.5, torch.zeros_like(xy[:, 1])), (h - 1).double())
    u0 = torch.minimum(u.floor().long(), (w - 2).clamp(min=0))
    v0 = torch.minimum(v.floor().long(), (h - 2).clamp(min=0))
    u1, v1 = torch.minimum(u0 + 1, w - 1), torch.minimum(v0 + 1, h - 1)
    fu, fv = u - u0, v - v0
    d00, d01 = flat[base + v0 * w + u0], flat[base + v0 * w + u1]
    d10, d11 = flat[base + v1 * w + u0], flat[base + v1 * w + u1]
    bil = (d00 * (1 - fu) + d01 * fu) * (1 - fv) + (d10 * (1 - fu) + d11 * fu) * fv
    nu = torch.minimum(xy[:, 0].floor().long().clamp(min=0), w - 1)
    nv = torch.minimum(xy[:, 1].floor().long().clamp(min=0), h - 1)
    near = flat[base + nv * w + nu]
    return torch.where(torch.isfinite(bil), bil, near)


def correspondences_from_depth(
    scene: PosedScene,
    view_indices: IndexLike,
    stride: int = 8,
    rel_depth_tol: float = 0.02,
    max_per_pair: Optional[int] = None,
    seed: int = 0,
    depths: Optional[Dict[int, torch.Tensor]] = None,
) -> Correspondences:
    """Dense correspondences by reprojecting depth, with an occlusion/consistency test.

    Source pixels are the centres of every ``stride``-th pixel (starting at ``stride // 2``)
    with valid depth. A source pixel lifted to 3D and projected into view ``b`` is kept when
    (1) it is in front of ``b`` (z > 0), (2) it falls inside ``b``'s image, and (3) ``b``'s depth
    at that position (bilinear between valid pixel centres, else nearest) agrees:
    ``|z - depth_b| <= rel_depth_tol * depth_b`` (rejects points occluded in ``b``).

    Args:
        scene: a scene with depth maps (z-depth, see :class:`PosedScene`).
        view_indices: S distinct scene view indices.
        stride: source pixel spacing in original-image pixels.
        rel_depth_tol: relative depth tolerance of the consistency test.
        max_per_pair: keep at most this many (random, seeded) per ordered view pair.
        seed: random seed for ``max_per_pair``.
        depths: optional cache ``{scene index: [H, W] depth}`` (original size) to avoid re-reading.
    """
    if scene.depth_paths is None and not depths:
        raise SceneError(f"scene {scene.name!r} has no depth maps (needed for correspondences_from_depth)")
    if stride < 1:
        raise SceneError(f"stride must be >= 1, got {stride}")
    idx = _check_view_set(scene, view_indices)
    vidx = torch.tensor(idx, dtype=torch.long)
    depths = {} if depths is None else depths
    for i in idx:
        if i not in depths:
            depths[i] = scene.load_depth([i])[0]
    sizes = scene.image_sizes[vidx]  # [S, 2] (H, W)
    flat = torch.cat([depths[i].double().flatten() for i in idx])
    offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes[:-1].prod(-1)]), 0)
    ks, c2ws = scene.intrinsics[vidx], scene.cam_to_world[vidx]
    src_v, dst_v, src_xy, dst_xy = [], [], [], []
    for a, i in enumerate(idx):
        h, w = scene.image_size(i)
        rows = torch.arange(stride // 2, h, stride)
        cols = torch.arange(stride // 2, w, stride)
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        z = depths[i][rr, cc].double().flatten()
        ok = torch.isfinite(z) & (z > 0)
        if not ok.any():
            continue
        pix = torch.stack([cc.flatten()[ok] + 0.5, rr.flatten()[ok] + 0.5], dim=-1).double()
        z = z[ok]
        world = unproject_pixels(pix, z, ks[a], c2ws[a])
        xy, zb = project_points(world, ks, c2ws)  # [S, P, 2], [S, P]
        hb, wb = sizes[:, 0:1].double(), sizes[:, 1:2].double()
        inside = (zb > 1e-9) & (xy[..., 0] >= 0) & (xy[..., 0] < wb) & (xy[..., 1] >= 0) & (xy[..., 1] < hb)
        inside[a] = False
        b_sel, p_sel = inside.nonzero(as_tuple=True)
        if len(b_sel) == 0:
            continue
        d_b = _sample_depths(flat, offsets, sizes, b_sel, xy[b_sel, p_sel])
        z_sel = zb[b_sel, p_sel]
        agree = torch.isfinite(d_b) & ((z_sel - d_b).abs() <= rel_depth_tol * d_b)
        b_sel, p_sel = b_sel[agree], p_sel[agree]
        src_xy.append(pix[p_sel])
        dst_xy.append(xy[b_sel, p_sel])
        src_v.append(torch.full((len(p_sel),), a, dtype=torch.long))
        dst_v.append(b_sel)
    if not src_v:
        return Correspondences.empty(vidx)
    sv, dv = torch.cat(src_v), torch.cat(dst_v)
    keep = _cap_pairs(sv, dv, len(idx), max_per_pair, seed)
    return Correspondences(
        src_view=sv[keep], dst_view=dv[keep], src_xy=torch.cat(src_xy)[keep].float(),
        dst_xy=torch.cat(dst_xy)[keep].float(), view_indices=vidx, point_ids=torch.full((len(keep),), -1),
    )
