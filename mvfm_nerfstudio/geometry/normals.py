"""Surface normals: from depth maps, between camera and world frames, angular error metrics, RGB coding.

Conventions (as :mod:`~mvfm_nerfstudio.geometry.cameras`):

* Normals are unit vectors ``[..., 3, H, W]`` (channel-first like images), float. In the **camera frame**
  they use OpenCV axes (x right, y down, z forward), so a surface facing the camera has ``n_z < 0``;
  in the **world frame** they are ``R n`` with ``R = cam_to_world[:3, :3]``. Invalid pixels are NaN.
* Normals always face the camera that sees them (``n . p <= 0`` for the camera-frame point ``p``).
* Depth is z-depth along the optical axis in scene units, NaN (or <= 0) where invalid.

Normals from depth (:func:`normals_from_depth`): each pixel centre ``(col + 0.5, row + 0.5)`` is lifted to
its camera-frame point ``p = z K^-1 (u, v, 1)``; the tangents along x and y are central differences of the
neighbouring points, or the one-sided difference when only one neighbour is usable; the normal is their
cross product. A neighbour is unusable when its depth is invalid or the relative depth jump
``|z_neighbour - z| / z`` exceeds ``max_rel_jump`` (a depth discontinuity: an occluding edge, where a
difference would mix two surfaces). A pixel without a usable x- and y-tangent has no normal (NaN).
"""

from __future__ import annotations

import math
from typing import Dict

import numpy as np
import torch

from .cameras import pixel_centers, unproject_pixels

__all__ = [
    "normals_from_depth",
    "rotate_normals",
    "camera_to_world_normals",
    "world_to_camera_normals",
    "angular_error",
    "angular_metrics",
    "ANGLE_THRESHOLDS",
    "normals_to_rgb",
    "error_to_rgb",
    "DEFAULT_MAX_REL_JUMP",
]

DEFAULT_MAX_REL_JUMP = 0.05
"""Default depth-discontinuity threshold of :func:`normals_from_depth` (5 % relative jump between pixels):
far above the per-pixel change of a surface seen at 10 degrees grazing angle at ~600 px focal length."""

ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)
"""Probe3D's accuracy thresholds in degrees (% of pixels with an angular error below each)."""


def _camera_points(depth: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """Camera-frame points ``[H, W, 3]`` (float64) of one ``[H, W]`` z-depth map."""
    h, w = depth.shape
    xy = pixel_centers(h, w, device=depth.device, dtype=torch.float64).reshape(-1, 2)
    identity = torch.eye(4, dtype=torch.float64, device=depth.device)
    pts = unproject_pixels(xy, depth.reshape(-1).double().nan_to_num(0.0), intrinsics.double(), identity)
    return pts.reshape(h, w, 3)


def _tangent(points: torch.Tensor, z: torch.Tensor, ok: torch.Tensor, dim: int, max_rel_jump: float):
    """Tangent ``[H, W, 3]`` along image axis ``dim`` (0 = rows, 1 = cols) and whether it exists ``[H, W]``."""
    n = points.shape[dim]

    def shift(x: torch.Tensor, step: int, fill) -> torch.Tensor:
        # out[i] = x[i + step] along dim, ``fill`` outside the image
        out = torch.full_like(x, fill)
        src = x.narrow(dim, max(step, 0), n - abs(step))
        out.narrow(dim, max(-step, 0), n - abs(step)).copy_(src)
        return out

    zf, zb = shift(z, 1, math.nan), shift(z, -1, math.nan)
    okf = ok & shift(ok, 1, False) & ((zf - z).abs() <= max_rel_jump * z)
    okb = ok & shift(ok, -1, False) & ((z - zb).abs() <= max_rel_jump * z)
    fwd = shift(points, 1, 0.0) - points
    bwd = points - shift(points, -1, 0.0)
    both = (okf & okb).unsqueeze(-1)
    tangent = torch.where(both, 0.5 * (fwd + bwd), torch.where(okf.unsqueeze(-1), fwd, bwd))
    return tangent, okf | okb


def normals_from_depth(
    depth: torch.Tensor, intrinsics: torch.Tensor, max_rel_jump: float = DEFAULT_MAX_REL_JUMP,
    smooth_radius: int = 0,
) -> torch.Tensor:
    """Camera-frame unit normals from z-depth maps (method in the module docstring).

    Args:
        depth: ``[H, W]`` or ``[S, H, W]`` z-depth in scene units; NaN, inf or <= 0 = invalid.
        intrinsics: ``[3, 3]`` or ``[S, 3, 3]`` pinhole K in pixels of the depth map.
        max_rel_jump: relative depth jump between neighbouring pixels above which they are taken to be on
            different surfaces (not differenced).
        smooth_radius: average the normals over a ``(2r+1)^2`` window of pixels that have one (then renormalise);
            0 = off. Sensor depth (mm steps, noise) needs it: one pixel at 2 m and 585 px focal length spans
            3.4 mm, so a 1 mm depth step alone tilts a per-pixel normal by ~16 degrees.

    Returns:
        ``[3, H, W]`` or ``[S, 3, H, W]`` float32 OpenCV camera-frame normals facing the camera, NaN where no
        normal exists (invalid depth, or no usable neighbour along x or y).
    """
    if not torch.is_tensor(depth) or depth.ndim not in (2, 3):
        raise ValueError(f"depth must be a [H, W] or [S, H, W] tensor, got {getattr(depth, 'shape', type(depth))}")
    single = depth.ndim == 2
    depth = depth[None] if single else depth
    k = intrinsics[None] if intrinsics.ndim == 2 else intrinsics
    if tuple(k.shape) != (depth.shape[0], 3, 3):
        raise ValueError(f"intrinsics must be [3, 3] or [{depth.shape[0]}, 3, 3] for depth {tuple(depth.shape)}, "
                         f"got {tuple(intrinsics.shape)}")
    if not max_rel_jump > 0:
        raise ValueError(f"max_rel_jump must be > 0, got {max_rel_jump}")
    out = []
    for d, kk in zip(depth, k):
        z = d.double()
        ok = torch.isfinite(z) & (z > 0)
        pts = _camera_points(torch.where(ok, z, torch.zeros_like(z)), kk)
        tx, okx = _tangent(pts, z, ok, 1, max_rel_jump)
        ty, oky = _tangent(pts, z, ok, 0, max_rel_jump)
        n = torch.linalg.cross(tx, ty, dim=-1)
        norm = n.norm(dim=-1, keepdim=True)
        valid = ok & okx & oky & (norm[..., 0] > 0)
        n = n / norm.clamp(min=1e-300)
        n = torch.where(((n * pts).sum(-1, keepdim=True) > 0), -n, n)  # face the camera
        if smooth_radius > 0:
            n = _box_average(n.permute(2, 0, 1), valid, smooth_radius).permute(1, 2, 0)
        n[~valid] = math.nan
        out.append(n.permute(2, 0, 1).float())
    result = torch.stack(out)
    return result[0] if single else result


def _box_average(n: torch.Tensor, valid: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean of the valid unit normals ``n [3, H, W]`` in a ``(2r+1)^2`` window, renormalised."""
    import torch.nn.functional as F

    w = valid.double()[None, None]
    k = 2 * radius + 1
    total = F.avg_pool2d(torch.where(valid, n, torch.zeros_like(n))[None], k, 1, radius, count_include_pad=False)
    count = F.avg_pool2d(w, k, 1, radius, count_include_pad=False)
    mean = (total / count.clamp(min=1e-12))[0]
    return mean / mean.norm(dim=0, keepdim=True).clamp(min=1e-12)


def rotate_normals(normals: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``R n`` per pixel: ``normals [..., 3, H, W]``, ``rotation [..., 3, 3]`` (same leading shape) ->
    ``[..., 3, H, W]``.

    NaN (invalid) pixels stay NaN. The result has the dtype of ``normals``.
    """
    r = rotation.to(normals.device, torch.float64)
    return torch.einsum("...ij,...jhw->...ihw", r, normals.double()).to(normals.dtype)


def camera_to_world_normals(normals: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """Camera-frame normals ``[..., 3, H, W]`` of cameras ``cam_to_world [..., 4, 4]`` (OpenCV) -> world frame."""
    return rotate_normals(normals, cam_to_world[..., :3, :3])


def world_to_camera_normals(normals: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """World-frame normals ``[..., 3, H, W]`` -> the camera frame of ``cam_to_world [..., 4, 4]`` (OpenCV)."""
    return rotate_normals(normals, cam_to_world[..., :3, :3].transpose(-1, -2))


def angular_error(pred: torch.Tensor, target: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Angle in degrees between ``pred`` and ``target`` along ``dim`` (the vector axis; default the channel
    axis of ``[..., 3, H, W]``). Neither needs unit length; NaN where either is NaN or zero.

    Computed with ``atan2(|a x b|, a . b)``, accurate also for tiny angles (``acos`` is not).
    """
    a, b = pred.double(), target.double()
    cross = torch.linalg.cross(a, b, dim=dim).norm(dim=dim)
    dot = (a * b).sum(dim)
    zero = (a.norm(dim=dim) == 0) | (b.norm(dim=dim) == 0)
    ang = torch.rad2deg(torch.atan2(cross, dot))
    return torch.where(zero, torch.full_like(ang, math.nan), ang).float()


def angular_metrics(errors_deg: torch.Tensor, thresholds=ANGLE_THRESHOLDS) -> Dict[str, float]:
    """Probe3D's normal metrics over every finite entry of ``errors_deg`` (degrees, any shape).

    Returns:
        ``mean``, ``median``, ``rmse`` (degrees) and ``pct_<t>`` (% of pixels with error < t, e.g.
        ``pct_11.25``), plus ``num_pixels``. Raises ``ValueError`` when there is no finite entry.
    """
    e = errors_deg.detach().flatten().double()
    e = e[torch.isfinite(e)]
    if e.numel() == 0:
        raise ValueError("angular_metrics: no valid pixel (every error is NaN: no ground truth where predicted?)")
    out = {
        "mean": float(e.mean()),
        "median": float(np.median(e.cpu().numpy())),
        "rmse": float(e.square().mean().sqrt()),
    }
    for t in thresholds:
        out[f"pct_{t:g}"] = float((e < t).double().mean() * 100)
    out["num_pixels"] = int(e.numel())
    return out


def normals_to_rgb(normals: torch.Tensor, camera_frame: bool = True) -> np.ndarray:
    """RGB coding ``[H, W, 3]`` uint8 of one normal map ``[3, H, W]`` for a PNG (invalid pixels black).

    Camera-frame normals are shown in the usual normal-map colours: ``RGB = ((x, -y, -z) + 1) / 2`` of the
    OpenCV normal, i.e. x right = red, y up = green, towards the viewer = blue (a wall facing the camera is
    lavender ``(128, 128, 255)``). World-frame normals (``camera_frame=False``) are ``((x, y, z) + 1) / 2``.
    """
    if normals.ndim != 3 or normals.shape[0] != 3:
        raise ValueError(f"normals must be [3, H, W], got {tuple(normals.shape)}")
    n = normals.detach().double().cpu()
    if camera_frame:
        n = n * torch.tensor([1.0, -1.0, -1.0], dtype=n.dtype, device=n.device)[:, None, None]
    valid = torch.isfinite(n).all(0)
    rgb = ((n.nan_to_num(0.0) + 1) * 0.5).clamp(0, 1) * 255
    rgb = rgb.round().to(torch.uint8).permute(1, 2, 0)
    rgb[~valid] = 0
    return rgb.numpy()


def error_to_rgb(errors_deg: torch.Tensor, max_deg: float = 45.0) -> np.ndarray:
    """Colour-coded angular error ``[H, W, 3]`` uint8 of ``errors_deg [H, W]``: 0 deg dark blue to ``max_deg``
    and above yellow (matplotlib's viridis); pixels without ground truth (NaN) black."""
    from matplotlib import colormaps

    e = errors_deg.detach().double().cpu().numpy()
    valid = np.isfinite(e)
    rgb = colormaps["viridis"](np.clip(np.nan_to_num(e) / max_deg, 0, 1))[..., :3]
    rgb = (rgb * 255).round().astype(np.uint8)
    rgb[~valid] = 0
    return rgb
