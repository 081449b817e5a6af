"""Lens distortion: the OpenCV/COLMAP ``OPENCV`` model ``(k1, k2, p1, p2)``.

Conventions (kornia style; the same as :mod:`.cameras`):

* The model acts on *normalised* camera coordinates ``(x, y) = (X/Z, Y/Z)`` of the OpenCV
  camera frame (x right, y down, z forward): ``r^2 = x^2 + y^2``,
  ``x_d = x (1 + k1 r^2 + k2 r^4) + 2 p1 x y + p2 (r^2 + 2 x^2)`` and
  ``y_d = y (1 + k1 r^2 + k2 r^4) + p1 (r^2 + 2 y^2) + 2 p2 x y``.
* Pixel coordinates use pixel centres at ``(col + 0.5, row + 0.5)``.
* The undistorted (pinhole) image keeps the distorted camera's ``fx, fy, cx, cy`` (and skew),
  so undistortion keeps the image size and the principal point.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["distort_normalized", "undistort_normalized", "has_distortion", "undistort_pixels", "undistortion_grid"]


def distort_normalized(xy: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Apply OPENCV distortion to normalised camera coordinates.

    Args:
        xy: ``[..., 2]`` undistorted normalised coordinates ``(X/Z, Y/Z)``.
        dist: ``[4]`` or broadcastable ``[..., 4]`` coefficients ``(k1, k2, p1, p2)``.
    Returns:
        ``[..., 2]`` distorted normalised coordinates.
    """
    k1, k2, p1, p2 = dist.to(xy.dtype).unbind(-1)
    x, y = xy.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return torch.stack([xd, yd], dim=-1)


def undistort_normalized(xy_d: torch.Tensor, dist: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Invert :func:`distort_normalized` by Newton iterations (analytic Jacobian).

    Args:
        xy_d: ``[..., 2]`` distorted normalised coordinates.
        dist: ``[4]`` or broadcastable ``[..., 4]`` ``(k1, k2, p1, p2)``.
    Returns:
        ``[..., 2]`` undistorted normalised coordinates (float64 precision internally).
    """
    dtype = xy_d.dtype
    target = xy_d.double()
    d = dist.double()
    k1, k2, p1, p2 = d.unbind(-1)
    xy = target.clone()
    for _ in range(iters):
        x, y = xy.unbind(-1)
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dr = 2 * (k1 + 2 * k2 * r2)  # d radial / d(x or y) divided by the coordinate
        j00 = radial + x * x * dr + 2 * p1 * y + 6 * p2 * x
        j01 = x * y * dr + 2 * p1 * x + 2 * p2 * y
        j11 = radial + y * y * dr + 6 * p1 * y + 2 * p2 * x
        res = distort_normalized(xy, d) - target
        if float(res.abs().max()) < 1e-13:
            break
        det = j00 * j11 - j01 * j01  # the Jacobian is symmetric
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        dx = (j11 * res[..., 0] - j01 * res[..., 1]) / det
        dy = (-j01 * res[..., 0] + j00 * res[..., 1]) / det
        xy = xy - torch.stack([dx, dy], dim=-1)
    return xy.to(dtype)


def has_distortion(dist: Optional[torch.Tensor]) -> bool:
    """Whether ``dist`` ``[..., 4]`` is given and not all zero."""
    return dist is not None and bool((dist.abs() > 0).any())


def undistort_pixels(xy: torch.Tensor, intrinsics: torch.Tensor, dist: Optional[torch.Tensor]) -> torch.Tensor:
    """Map pixel coordinates of a distorted image ``[..., 2]`` to the undistorted pinhole image (float64).

    ``intrinsics`` is ``[3, 3]`` or per point ``[..., 3, 3]``; ``dist`` ``[4]`` or ``[..., 4]``.
    The undistorted image uses the same intrinsics (see module docstring). Returns the input
    unchanged (as float64) when ``dist`` is None or all zeros.
    """
    xy = xy.double()
    if not has_distortion(dist):
        return xy
    k = intrinsics.double()
    fx, fy, cx, cy, s = k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2], k[..., 0, 1]
    yn = (xy[..., 1] - cy) / fy
    xn = (xy[..., 0] - cx - s * yn) / fx
    und = undistort_normalized(torch.stack([xn, yn], dim=-1), dist)
    u = fx * und[..., 0] + s * und[..., 1] + cx
    v = fy * und[..., 1] + cy
    return torch.stack([u, v], dim=-1)


def undistortion_grid(intrinsics: torch.Tensor, dist: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grid ``[1, H, W, 2]`` that resamples a distorted image into the pinhole one."""
    k = intrinsics.double()
    fx, fy, cx, cy, s = k[0, 0], k[1, 1], k[0, 2], k[1, 2], k[0, 1]
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=k.device) + 0.5,
        torch.arange(width, dtype=torch.float64, device=k.device) + 0.5,
        indexing="ij",
    )
    yn = (v - cy) / fy
    xn = (u - cx - s * yn) / fx
    xd, yd = distort_normalized(torch.stack([xn, yn], dim=-1), dist.double()).unbind(-1)
    ud = fx * xd + s * yd + cx
    vd = fy * yd + cy
    # align_corners=False: -1 and +1 are the outer image borders, i.e. pixel coordinate 0 and W.
    grid = torch.stack([2 * ud / width - 1, 2 * vd / height - 1], dim=-1)
    return grid.float().unsqueeze(0)
