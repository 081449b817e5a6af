"""Multi-view consistency metrics (METHOD.md, "Evaluation").

* **Loc. Err.**: for each correspondence, the query feature is bilinearly sampled at the query
  pixel; the predicted location is the centre of the target-view cell with the highest cosine
  similarity (hard argmax); the error is the L1 distance to the true location in normalised
  ``[-1, 1]`` coordinates, averaged over x and y (``0.1`` = 5 % of the image width, ~26 px at
  518 px). Cell centres sit at ``(c + 0.5) * patch`` pixels and the ground truth uses pixel
  centres (:mod:`mvfm_nerfstudio.geometry.feature_grid`), so a perfect feature match leaves only the quantisation error of the
  grid: ``~1/(2w)`` per axis for ``w`` cells (0.0135 at 37 cells, 0.031 at 16 cells).
* **PCK@t**: fraction of correspondences whose predicted cell centre lies within ``t`` pixels
  (Euclidean, pixels of the evaluated images) of the true location.
* **Base Sim.**: mean per-pixel cosine similarity between MVFM and base features.
* **Viewpoint curve**: Loc. Err. binned by the angle between the two views' central rays
  (optical axes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..geometry.feature_grid import cell_centers, normalized_to_pixel, pixel_to_normalized, query_similarity

if TYPE_CHECKING:
    from ..data import Correspondences

__all__ = [
    "MatchResult",
    "match_argmax",
    "base_similarity",
    "viewpoint_angle",
    "summarize_matches",
    "bin_by_angle",
]


@dataclass
class MatchResult:
    """Per-correspondence results of hard-argmax matching (all ``[P]`` or ``[P, 2]``)."""

    pred_xy: torch.Tensor
    """Predicted target location (pixel (u, v), a cell centre)."""
    gt_xy: torch.Tensor
    """True target location (pixel (u, v))."""
    loc_err: torch.Tensor
    """Mean over x, y of the L1 error in normalised [-1, 1] coordinates."""
    pixel_err: torch.Tensor
    """Euclidean error in pixels."""


@torch.no_grad()
def match_argmax(
    features: torch.Tensor,
    corr: "Correspondences",
    image_size: Tuple[int, int],
) -> MatchResult:
    """Hard-argmax matching of one view set's correspondences.

    Args:
        features: ``[S, C, h, w]`` features of the set's views.
        corr: the set's correspondences (``src_view``/``dst_view`` ``[P]`` positions 0..S-1,
            ``src_xy``/``dst_xy`` ``[P, 2]`` pixel (u, v) in ``image_size`` images, pixel centres).
        image_size: ``(H, W)`` of the images the features come from.
    """
    grid = tuple(features.shape[-2:])
    src_norm = pixel_to_normalized(corr.src_xy.float(), image_size)
    sim = query_similarity(features.float(), corr.src_view, corr.dst_view, src_norm)
    centers = cell_centers(grid, device=features.device)
    pred_norm = centers[sim.argmax(dim=-1)]
    dst_xy = corr.dst_xy.float()
    gt_norm = pixel_to_normalized(dst_xy, image_size)
    pred_xy = normalized_to_pixel(pred_norm, image_size)
    return MatchResult(
        pred_xy=pred_xy,
        gt_xy=dst_xy,
        loc_err=(pred_norm - gt_norm).abs().mean(-1),
        pixel_err=(pred_xy - dst_xy).norm(dim=-1),
    )


@torch.no_grad()
def base_similarity(features: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Per-pixel cosine similarity ``[..., h, w]`` of ``[..., C, h, w]`` MVFM and base features."""
    return F.cosine_similarity(features.float(), base.float(), dim=-3, eps=1e-8)


def viewpoint_angle(cam_to_world_a: torch.Tensor, cam_to_world_b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between the central rays (optical axes, OpenCV +z) of two cameras ``[..., 4, 4]``."""
    za = F.normalize(cam_to_world_a[..., :3, 2].double(), dim=-1)
    zb = F.normalize(cam_to_world_b[..., :3, 2].double(), dim=-1)
    return torch.rad2deg(torch.acos((za * zb).sum(-1).clamp(-1, 1))).float()


def summarize_matches(
    loc_err: torch.Tensor, pixel_err: torch.Tensor, pck_thresholds: Sequence[float]
) -> Dict[str, float]:
    """Mean Loc. Err. and PCK at each pixel threshold (keys ``loc_err``, ``pck@<t>px``, ``num_matches``)."""
    n = int(loc_err.numel())
    out: Dict[str, float] = {"loc_err": float(loc_err.mean()) if n else math.nan, "num_matches": n}
    for t in pck_thresholds:
        out[f"pck@{t:g}px"] = float((pixel_err <= t).float().mean()) if n else math.nan
    return out


def bin_by_angle(angles: torch.Tensor, values: Dict[str, torch.Tensor], bin_deg: float = 1.0) -> List[Dict[str, float]]:
    """Mean of each per-match value in angle bins ``[k*bin_deg, (k+1)*bin_deg)``; empty bins are left out.

    Args:
        angles: ``[P]`` degrees.
        values: name -> ``[P]`` (e.g. ``{"base": ..., "mvfm": ...}`` Loc. Err.).

    Returns:
        One dict per non-empty bin: ``angle_lo``, ``angle_hi``, ``count`` and the mean of every value.
    """
    if bin_deg <= 0:
        raise ValueError(f"bin_deg must be > 0, got {bin_deg}")
    if angles.numel() == 0:
        return []
    idx = torch.floor(angles.double() / bin_deg).long()
    rows = []
    for k in torch.unique(idx).tolist():
        sel = idx == k
        row = {"angle_lo": k * bin_deg, "angle_hi": (k + 1) * bin_deg, "count": int(sel.sum())}
        row.update({name: float(v[sel].float().mean()) for name, v in values.items()})
        rows.append(row)
    return rows
