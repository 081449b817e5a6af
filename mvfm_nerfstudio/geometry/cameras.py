"""Camera conventions, validation, normalisation and Plücker ray maps.

Conventions used throughout the MVFM core (kornia style):

* **OpenCV camera frame**: x right, y down, z forward (the camera looks along +z).
* **OpenGL / Nerfstudio camera frame**: x right, y up, z backward (looks along -z).
* ``cam_to_world``: ``[..., 4, 4]`` homogeneous matrix mapping camera coordinates to
  world coordinates, ``X_world = R @ X_cam + t``. The camera centre is ``t``.
* ``intrinsics``: ``[..., 3, 3]`` pinhole matrix ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``
  in pixels of the image the rays are computed for.
* Pixel coordinates: ``u`` runs along the width (columns), ``v`` along the height (rows);
  the centre of pixel ``(row i, col j)`` is at ``(u, v) = (j + 0.5, i + 0.5)``, i.e. the
  top-left corner of the image is ``(0, 0)`` (the COLMAP / OpenCV-with-centres convention).
* Units: whatever the world uses; :func:`normalize_cameras` removes the scale.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple

import torch

__all__ = [
    "CameraError",
    "OPENGL_TO_OPENCV",
    "opencv_to_opengl",
    "opengl_to_opencv",
    "to_homogeneous",
    "validate_intrinsics",
    "validate_cam_to_world",
    "geometric_median",
    "mean_rotation",
    "normalize_cameras",
    "normalize_cameras_first_view",
    "pixel_centers",
    "camera_rays",
    "plucker_ray_map",
    "plucker_rays",
    "invert_pose",
    "scale_intrinsics",
    "look_at",
    "look_along",
    "project_points",
    "unproject_pixels",
    "pixel_directions",
    "view_distances",
    "select_neighbor_views",
]


class CameraError(ValueError):
    """Raised for invalid camera inputs (NaN, non-rotation, bad intrinsics, wrong shape)."""


# Flips y and z: converts between the OpenCV and OpenGL camera frames (its own inverse).
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))  # device: a constant, moved to the caller's device where used


def to_homogeneous(cam_to_world: torch.Tensor) -> torch.Tensor:
    """Pad ``[..., 3, 4]`` poses to ``[..., 4, 4]``; ``[..., 4, 4]`` is returned unchanged."""
    if cam_to_world.shape[-2:] == (4, 4):
        return cam_to_world
    if cam_to_world.shape[-2:] != (3, 4):
        raise CameraError(f"camera poses must be [..., 3, 4] or [..., 4, 4], got {tuple(cam_to_world.shape)}")
    bottom = torch.zeros(*cam_to_world.shape[:-2], 1, 4, dtype=cam_to_world.dtype, device=cam_to_world.device)
    bottom[..., 0, 3] = 1
    return torch.cat([cam_to_world, bottom], dim=-2)


def _flip_yz(cam_to_world: torch.Tensor) -> torch.Tensor:
    flip = OPENGL_TO_OPENCV.to(dtype=cam_to_world.dtype, device=cam_to_world.device)
    c2w = to_homogeneous(cam_to_world)
    out = c2w @ flip
    return out if cam_to_world.shape[-2] == 4 else out[..., :3, :]


def opengl_to_opencv(cam_to_world: torch.Tensor) -> torch.Tensor:
    """Convert OpenGL/Nerfstudio camera-to-world ``[..., 3|4, 4]`` to OpenCV convention.

    Only the camera axes change (y and z are negated); the camera centre and the world
    frame are unchanged. The output has the same shape as the input.
    """
    return _flip_yz(cam_to_world)


def opencv_to_opengl(cam_to_world: torch.Tensor) -> torch.Tensor:
    """Convert OpenCV camera-to-world ``[..., 3|4, 4]`` to OpenGL/Nerfstudio convention."""
    return _flip_yz(cam_to_world)


def _view_index(flat_index: int, batch_shape: Tuple[int, ...]) -> str:
    if not batch_shape:
        return ""
    idx = []
    for size in reversed(batch_shape):
        idx.append(flat_index % size)
        flat_index //= size
    return " at index " + str(tuple(reversed(idx)))


def _first_bad(bad: torch.Tensor, batch_shape: Tuple[int, ...]) -> Optional[Tuple[int, str]]:
    """``(flat index, " at index (...)")`` of the first True in ``bad`` ``[N]`` (a CPU tensor), or None."""
    hits = bad.nonzero()
    if hits.numel() == 0:
        return None
    i = int(hits[0])
    return i, _view_index(i, batch_shape)


def _as_cpu_batch(x: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """``[..., a, b]`` -> ``[N, a, b]`` float64 on the CPU (one copy of a few numbers: the checks then cost no
    device synchronisation each)."""
    return x.detach().reshape(-1, *shape).to("cpu", torch.float64)


def validate_intrinsics(intrinsics: torch.Tensor, name: str = "intrinsics") -> None:
    """Check ``[..., 3, 3]`` pinhole matrices: finite, positive focal lengths, last row (0, 0, 1).

    Works on any device (the check runs on a CPU copy).

    Raises:
        CameraError: naming the first offending camera.
    """
    if intrinsics.shape[-2:] != (3, 3):
        raise CameraError(f"{name} must be [..., 3, 3], got {tuple(intrinsics.shape)}")
    batch_shape = tuple(intrinsics.shape[:-2])
    flat = _as_cpu_batch(intrinsics, (3, 3))
    last_row = torch.tensor([0.0, 0.0, 1.0], dtype=flat.dtype, device=flat.device)
    checks = (
        (~torch.isfinite(flat).all(dim=(-1, -2)), "contain NaN or inf"),
        ((flat[:, 0, 0] <= 0) | (flat[:, 1, 1] <= 0), "need positive focal lengths fx, fy"),
        (((flat[:, 2] - last_row).abs() > 1e-6).any(dim=-1) | (flat[:, 1, 0].abs() > 1e-6),
         "must be upper-triangular pinhole matrices with last row (0, 0, 1)"),
    )
    for bad, what in checks:
        found = _first_bad(bad, batch_shape)
        if found is not None:
            raise CameraError(f"{name} {what}{found[1]}")


def validate_cam_to_world(cam_to_world: torch.Tensor, name: str = "cam_to_world", atol: float = 1e-3) -> None:
    """Check ``[..., 4, 4]`` poses: finite, rotation block orthonormal with det +1, last row (0, 0, 0, 1).

    Works on any device (the check runs on a CPU copy).

    Args:
        cam_to_world: poses to check.
        atol: tolerance on ``R^T R - I`` and ``det R - 1`` (float32 poses read from text
            files are only orthonormal to ~1e-6; 1e-3 still rejects scaled or sheared poses).

    Raises:
        CameraError: naming the first offending camera.
    """
    if cam_to_world.shape[-2:] != (4, 4):
        raise CameraError(f"{name} must be [..., 4, 4], got {tuple(cam_to_world.shape)}")
    batch_shape = tuple(cam_to_world.shape[:-2])
    flat = _as_cpu_batch(cam_to_world, (4, 4))
    last_row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=flat.dtype, device=flat.device)
    for bad, what in (
        (~torch.isfinite(flat).all(dim=(-1, -2)), "contain NaN or inf"),
        (((flat[:, 3] - last_row).abs() > 1e-6).any(dim=-1), "must have last row (0, 0, 0, 1)"),
    ):
        found = _first_bad(bad, batch_shape)
        if found is not None:
            raise CameraError(f"{name} {what}{found[1]}")
    rot = flat[:, :3, :3]
    eye = torch.eye(3, dtype=flat.dtype, device=flat.device)
    ortho_err = (rot.transpose(-1, -2) @ rot - eye).abs().amax(dim=(-1, -2))
    det = torch.linalg.det(rot)
    found = _first_bad((ortho_err > atol) | ((det - 1).abs() > atol), batch_shape)
    if found is not None:
        i, where = found
        raise CameraError(
            f"{name} rotation block is not a rotation (|R^T R - I| = {float(ortho_err[i]):.3g}, "
            f"det = {float(det[i]):.3g}){where}; "
            "poses must be rigid camera-to-world transforms without scale or reflection"
        )


def geometric_median(points: torch.Tensor, iters: int = 64, eps: float = 1e-9) -> torch.Tensor:
    """Robust centre of a point set by Weiszfeld iterations.

    Equivariant to rotation, translation and scale of the points (unlike a per-coordinate
    median), and robust to a minority of outliers (unlike the mean).

    Args:
        points: ``[..., N, D]``.
    Returns:
        ``[..., D]``.
    """
    center = points.mean(dim=-2)
    scale = (points - center.unsqueeze(-2)).norm(dim=-1).mean(dim=-1, keepdim=True).clamp_min(1e-30)
    for _ in range(iters):
        dist = (points - center.unsqueeze(-2)).norm(dim=-1)
        weights = 1.0 / torch.clamp(dist, min=eps * scale)
        center = (weights.unsqueeze(-1) * points).sum(-2) / weights.sum(-1, keepdim=True)
    return center


def mean_rotation(rotations: torch.Tensor) -> torch.Tensor:
    """Chordal L2 mean of rotations ``[..., N, 3, 3] -> [..., 3, 3]``.

    Projects the arithmetic mean onto SO(3) with an SVD. It is left-equivariant
    (``mean(G R_i) = G mean(R_i)``) and independent of the order of the rotations.
    """
    m = rotations.double().sum(dim=-3)
    u, _, vh = torch.linalg.svd(m)
    d = torch.sign(torch.linalg.det(u @ vh))
    fix = torch.ones_like(m[..., 0])
    fix[..., 2] = d
    return (u * fix.unsqueeze(-2)) @ vh


ReferenceFrame = Literal["mean", "first", "authors"]


def normalize_cameras(
    cam_to_world: torch.Tensor,
    reference: ReferenceFrame = "mean",
    radius: float = 2.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Express a set of cameras in a canonical frame that removes global rigid motion and scale.

    Follows the MVFM recipe (centre the cameras, fix the scale, rotate into a reference
    frame), made robust to outlier cameras:

    1. origin = geometric median of the camera centres;
    2. scale so the *median* camera distance to that origin is ``radius`` (the paper puts
       the reference view at distance 2; the median cannot be zero or explode because of
       one view). If all centres coincide (pure rotation) the scale is left at 1;
    3. axes = the rotation of view 0 (``reference="first"``, as in the paper) or the
       chordal mean rotation of all views (``reference="mean"``, which makes the result
       independent of view order).

    Args:
        cam_to_world: ``[..., S, 4, 4]`` OpenCV camera-to-world poses of one set of S views.
        reference: which rotation defines the canonical axes; ``"authors"`` delegates to
            :func:`normalize_cameras_first_view` (the MVFM authors' recipe, not the robust one above).
        radius: target median distance of the camera centres from the origin.

    Returns:
        ``(normalized [..., S, 4, 4], scale [...])``: the poses in the canonical frame
        (same dtype as the input) and the scale factor applied to world units.
    """
    if reference == "authors":
        return normalize_cameras_first_view(cam_to_world, radius)
    c2w = cam_to_world.double()
    rot, centers = c2w[..., :3, :3], c2w[..., :3, 3]
    origin = geometric_median(centers)
    offsets = centers - origin.unsqueeze(-2)
    median_dist = offsets.norm(dim=-1).median(dim=-1).values
    # A set whose cameras (nearly) coincide has no meaningful scale.
    extent = centers.abs().amax(dim=(-1, -2)).clamp_min(1.0)
    degenerate = median_dist <= 1e-9 * extent
    scale = torch.where(degenerate, torch.ones_like(median_dist), radius / median_dist.clamp_min(1e-300))
    if reference == "first":
        ref_rot = rot[..., 0, :, :]
    elif reference == "mean":
        ref_rot = mean_rotation(rot)
    else:
        raise ValueError(f"reference must be 'mean' or 'first', got {reference!r}")
    ref_inv = ref_rot.transpose(-1, -2).unsqueeze(-3)
    out = torch.zeros_like(c2w)
    out[..., :3, :3] = ref_inv @ rot
    out[..., :3, 3] = (ref_inv @ (offsets * scale[..., None, None]).unsqueeze(-1)).squeeze(-1)
    out[..., 3, 3] = 1
    return out.to(cam_to_world.dtype), scale.to(cam_to_world.dtype)


def normalize_cameras_first_view(cam_to_world: torch.Tensor, radius: float = 2.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The MVFM authors' camera normalisation: view 0's frame, scaled so view 0 is ``radius`` from the centroid.

    What their data loader computes before building Plücker rays (reproduced to run their checkpoints):

    1. inliers: cameras whose centre is within ``10 x`` the 0.97-quantile of the distances to the
       per-coordinate (lower) median centre, capped at 1e6;
    2. ``s = radius / |c_0 - mean(inlier centres)|`` (``s = radius`` when that distance is below 1e-5);
    3. every camera expressed in view 0's camera frame and scaled: ``R_i' = R_0^T R_i``,
       ``t_i' = s R_0^T (c_i - c_0)`` (view 0 becomes the identity at the origin).

    Unlike :func:`normalize_cameras` the result depends on which view is first and is not robust
    to an outlier view 0.

    Args:
        cam_to_world: ``[..., S, 4, 4]`` OpenCV camera-to-world poses of one set of S views.
        radius: distance of view 0 from the centroid after scaling (2 in the authors' code).

    Returns:
        ``(normalized [..., S, 4, 4], scale [...])`` as :func:`normalize_cameras`.
    """
    c2w = cam_to_world.double()
    rot, centers = c2w[..., :3, :3], c2w[..., :3, 3]
    dist = (centers - centers.median(dim=-2, keepdim=True).values).norm(dim=-1)  # [..., S]
    limit = (torch.quantile(dist, 0.97, dim=-1, keepdim=True) * 10).clamp(max=1e6)
    inlier = (dist <= limit).to(c2w.dtype)
    centroid = (centers * inlier[..., None]).sum(-2) / inlier.sum(-1, keepdim=True)
    first = (centers[..., 0, :] - centroid).norm(dim=-1)
    scale = torch.where(first <= 1e-5, torch.full_like(first, radius), radius / first.clamp_min(1e-300))
    ref_inv = rot[..., 0, :, :].transpose(-1, -2).unsqueeze(-3)
    out = torch.zeros_like(c2w)
    out[..., :3, :3] = ref_inv @ rot
    offsets = (centers - centers[..., :1, :]) * scale[..., None, None]
    out[..., :3, 3] = (ref_inv @ offsets.unsqueeze(-1)).squeeze(-1)
    out[..., 3, 3] = 1
    return out.to(cam_to_world.dtype), scale.to(cam_to_world.dtype)


def pixel_centers(
    height: int, width: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Pixel-centre coordinates ``[H, W, 2]`` as ``(u, v) = (col + 0.5, row + 0.5)``."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    return torch.stack([u, v], dim=-1)


def camera_rays(
    intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """World-space rays through every pixel centre.

    Args:
        intrinsics: ``[..., 3, 3]`` pinhole matrices in pixels of an ``height x width`` image.
        cam_to_world: ``[..., 4, 4]`` OpenCV camera-to-world poses.

    Returns:
        ``(origins [..., H, W, 3], directions [..., H, W, 3])`` with unit directions.
    """
    pix = pixel_centers(height, width, device=intrinsics.device, dtype=intrinsics.dtype)
    pix_h = torch.cat([pix, torch.ones_like(pix[..., :1])], dim=-1)  # [H, W, 3]
    k_inv = torch.linalg.inv(intrinsics)  # [..., 3, 3]
    dirs_cam = torch.einsum("...ij,hwj->...hwi", k_inv, pix_h)
    dirs = torch.einsum("...ij,...hwj->...hwi", cam_to_world[..., :3, :3], dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cam_to_world[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def plucker_rays(intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-pixel Plücker ray map ``(d, o x d)`` at image resolution.

    Args:
        intrinsics: ``[..., 3, 3]`` pinhole matrices in pixels of an ``height x width`` image.
        cam_to_world: ``[..., 4, 4]`` OpenCV camera-to-world poses (usually normalised first
            with :func:`normalize_cameras`).
        height, width: image size in pixels.

    Returns:
        ``[..., 6, H, W]``: channels 0-2 the unit ray direction ``d``, channels 3-5 the
        moment ``o x d`` (``o`` = camera centre), both in world coordinates.
    """
    origins, dirs = camera_rays(intrinsics, cam_to_world, height, width)
    moments = torch.cross(origins, dirs, dim=-1)
    rays = torch.cat([dirs, moments], dim=-1)  # [..., H, W, 6]
    return rays.movedim(-1, -3)


def plucker_ray_map(intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """Fast path of :func:`plucker_rays`: ray maps of many cameras, flattened, in float32.

    Args:
        intrinsics: ``[..., 3, 3]`` pinhole matrices in pixels of an ``height x width`` image.
        cam_to_world: ``[..., 4, 4]`` OpenCV camera-to-world poses (same leading shape).
        height, width: image size in pixels.
        device: where the maps are built (default: the cameras' device). The per-camera 6x3 matrices are
            formed in float64 where the cameras are (usually the CPU), then moved.

    Returns:
        ``[N, 6, H, W]`` float32, ``N`` = number of cameras (leading dims flattened).

    The same rays as the float64 reference :func:`plucker_rays` (unit direction ``d``,
    moment ``o x d``, pixel centres at ``col + 0.5``), computed as one small matrix product per
    camera: with ``p = (u, v, 1)``, ``(d, o x d) = A p / |R K^-1 p|`` where
    ``A = [R K^-1; [o]_x R K^-1]`` (6x3, built in float64). This avoids the per-pixel
    float64 pipeline and writes the channels-first layout the patch embedding wants.
    """
    k = intrinsics.reshape(-1, 3, 3).double()
    c2w = cam_to_world.reshape(-1, 4, 4).double()
    rk = c2w[:, :3, :3] @ torch.linalg.inv(k)  # [N, 3, 3]
    o = c2w[:, :3, 3]
    zero = torch.zeros_like(o[:, 0])
    cross = torch.stack([  # [o]_x, so that [o]_x y = o x y
        torch.stack([zero, -o[:, 2], o[:, 1]], -1),
        torch.stack([o[:, 2], zero, -o[:, 0]], -1),
        torch.stack([-o[:, 1], o[:, 0], zero], -1),
    ], -2)
    a = torch.cat([rk, cross @ rk], dim=1).float().to(device or k.device)[..., None, None]  # [N, 6, 3, 1, 1]
    u = torch.arange(width, device=a.device, dtype=a.dtype) + 0.5
    v = torch.arange(height, device=a.device, dtype=a.dtype)[:, None] + 0.5
    raw = (a[:, :, 1] * v + a[:, :, 2]) + a[:, :, 0] * u  # A (u, v, 1)^T, separable: [N, 6, H, W]
    d = raw[:, :3]
    # explicit sum of squares: vector_norm over the channel dim is ~20x slower on CPU here
    return raw * (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1] + d[:, 2] * d[:, 2]).rsqrt_()[:, None]



def scale_intrinsics(intrinsics: torch.Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> torch.Tensor:
    """Intrinsics ``[..., 3, 3]`` of an image resized from ``from_size`` to ``to_size`` (both ``(H, W)``).

    ``K' = diag(W'/W, H'/H, 1) K``: exact with pixel centres at ``col + 0.5`` (the image is resized,
    not cropped, so pixel coordinate ``u`` maps to ``u W'/W``). Same dtype as the input.
    """
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    out = intrinsics.clone()
    out[..., 0, :] *= sx
    out[..., 1, :] *= sy
    return out


def invert_pose(pose: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid transforms ``[..., 4, 4]`` (or ``[..., 3, 4]``) -> ``[..., 4, 4]``.

    Camera-to-world to world-to-camera and back, in closed form ``[R^T, -R^T t]`` (differentiable,
    exact for rigid poses; no general matrix inverse). The camera axes convention is kept: OpenCV
    camera-to-world gives OpenCV world-to-camera.
    """
    c2w = to_homogeneous(pose)
    rot_t = c2w[..., :3, :3].transpose(-1, -2)
    top = torch.cat([rot_t, -rot_t @ c2w[..., :3, 3:4]], dim=-1)
    return torch.cat([top, c2w[..., 3:4, :]], dim=-2)


def look_at(center: torch.Tensor, target: torch.Tensor, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV camera-to-world ``[4, 4]`` of a camera at ``center [3]`` looking at ``target [3]``.

    The camera's y axis (down) is as close to ``-up`` as possible (no roll for ``up`` = world up);
    ``up`` must not be parallel to the viewing direction. Same dtype and device as ``center``.
    """
    return look_along(center, target - center, up)


def look_along(origin: torch.Tensor, direction: torch.Tensor, up=None) -> torch.Tensor:
    """OpenCV camera-to-world ``[4, 4]`` of a camera at ``origin [3]`` looking along ``direction [3]``.

    Args:
        origin, direction: ``[3]``; ``direction`` of any non-zero length.
        up: world up (the camera's -y); None = world +z, or +y when the direction is within ~25
            degrees of +-z (so any direction works).
    """
    z = direction / direction.norm()
    if up is None:
        up = (0.0, 0.0, 1.0) if float(z[2].abs()) < 0.9 else (0.0, 1.0, 0.0)
    up_t = torch.as_tensor(up, dtype=z.dtype, device=z.device)
    x = torch.linalg.cross(z, up_t)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=z.dtype, device=z.device)
    return torch.cat([torch.stack([x, y, z, origin.to(z.dtype)], dim=-1), bottom], dim=0)


def project_points(
    points: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Project world points ``[P, 3]`` into one camera (``[3, 3]``, ``[4, 4]``) or several (``[S, 3, 3]``,
    ``[S, 4, 4]``, OpenCV camera-to-world).

    Returns:
        ``(xy [..., P, 2], z [..., P])`` float64: pixel coordinates (pixel-centre convention) and
        z-depth. Points with ``z <= 1e-9`` (behind the camera) get meaningless ``xy``; test ``z`` first.
    """
    w2c = invert_pose(cam_to_world.double())
    cam = points.double() @ w2c[..., :3, :3].transpose(-1, -2) + w2c[..., None, :3, 3]
    z = cam[..., 2]
    pix = cam @ intrinsics.double().transpose(-1, -2)
    xy = pix[..., :2] / torch.where(z > 1e-9, z, torch.ones_like(z)).unsqueeze(-1)
    return xy, z


def pixel_directions(xy: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor) -> torch.Tensor:
    """World directions ``[P, 3]`` through pixel coordinates ``xy [P, 2]`` of one camera, scaled to unit z-depth.

    ``d = R K^-1 (u, v, 1)``: a point at z-depth ``z`` along the pixel is ``c + z d`` (``c`` the camera
    centre); normalise ``d`` for unit rays. Float64.
    """
    k = intrinsics.double()
    pix = torch.cat([xy.double(), torch.ones_like(xy[..., :1], dtype=torch.float64)], dim=-1)
    return pix @ torch.linalg.inv(k).transpose(-1, -2) @ cam_to_world[..., :3, :3].double().transpose(-1, -2)


def unproject_pixels(
    xy: torch.Tensor, depth: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor
) -> torch.Tensor:
    """World points ``[P, 3]`` (float64) at z-depth ``depth [P]`` along pixel coordinates ``xy [P, 2]`` of one camera."""
    dirs = pixel_directions(xy, intrinsics, cam_to_world)
    return dirs * depth.double().unsqueeze(-1) + cam_to_world[..., :3, 3].double()


def view_distances(cam_to_world: torch.Tensor) -> torch.Tensor:
    """Pose distance between every pair of views of a set: ``[..., S, 4, 4] -> [..., S, S]`` float64.

    ``|c_i - c_j| / r + (1 - cos angle(z_i, z_j))`` with camera centres ``c``, optical axes ``z``
    (OpenCV, third column of the rotation) and ``r`` the median camera distance to the centroid,
    so the measure does not depend on the scene's scale. The diagonal is 0.
    """
    centers = cam_to_world[..., :3, 3].double()
    axes = cam_to_world[..., :3, 2].double()
    radius = (centers - centers.mean(-2, keepdim=True)).norm(dim=-1).median(-1).values.clamp_min(1e-12)
    dist = torch.cdist(centers, centers) / radius[..., None, None]
    return dist + (1 - axes @ axes.transpose(-1, -2))


def select_neighbor_views(
    num_neighbors: int, views: int, batch: int = 1, cam_to_world: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Choose, for each view, the ``K = min(num_neighbors, S-1)`` closest other views.

    Closeness with poses: :func:`view_distances` (use normalised poses from
    :func:`normalize_cameras`, or any similarity frame: the measure is scale-free). Without poses,
    views are taken as a sequence and the closest indices are chosen (``i-1, i+1, i-2, ...``).

    Args:
        num_neighbors: wanted K.
        views: S.
        batch: B (without poses).
        cam_to_world: optional ``[B, S, 4, 4]`` OpenCV poses.
        device: device of the result without poses.

    Returns:
        ``[B, S, K]`` long indices of the neighbour views (never the view itself), closest first.
    """
    k = min(num_neighbors, views - 1)
    if cam_to_world is not None:
        dist = view_distances(cam_to_world)
    else:
        idx = torch.arange(views, device=device, dtype=torch.float64)
        # |i - j|, with a small bias so the earlier of two equally distant views comes first
        dist = (idx[:, None] - idx[None, :]).abs() + 1e-3 * (idx[None, :] > idx[:, None])
        dist = dist.expand(batch, -1, -1)
    dist = dist + torch.diag(torch.full((views,), float("inf"), dtype=dist.dtype, device=dist.device))
    order = torch.argsort(dist, dim=-1, stable=True)
    return order[..., :k]
