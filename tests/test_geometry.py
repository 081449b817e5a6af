"""Camera conventions, normalisation and Plücker rays."""

from __future__ import annotations


import pytest
import torch

from conftest import look_at_opencv, orbit_cameras
from mvfm_nerfstudio.geometry.cameras import (
    CameraError,
    camera_rays,
    geometric_median,
    mean_rotation,
    normalize_cameras,
    opencv_to_opengl,
    opengl_to_opencv,
    plucker_rays,
    to_homogeneous,
    validate_cam_to_world,
    validate_intrinsics,
)


def random_rigid(seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = scale * q
    m[:3, 3] = torch.randn(3, generator=g, dtype=torch.float64) * 5
    return m


def apply_similarity(c2w: torch.Tensor, sim: torch.Tensor) -> torch.Tensor:
    """World transform X' = s R X + t applied to cam-to-world poses (rotation stays orthonormal)."""
    s = sim[:3, :3].det().abs() ** (1 / 3)
    out = c2w.clone().double()
    out[..., :3, :3] = (sim[:3, :3] / s) @ c2w[..., :3, :3].double()
    out[..., :3, 3] = (sim[:3, :3] @ c2w[..., :3, 3].double().unsqueeze(-1)).squeeze(-1) + sim[:3, 3]
    return out


def test_opengl_opencv_round_trip_and_axes():
    _, c2w = orbit_cameras(1, 3, 32, 32)
    gl = opencv_to_opengl(c2w)
    assert torch.allclose(opengl_to_opencv(gl), c2w)
    # OpenGL looks along -z: the OpenCV forward axis equals minus the OpenGL z axis
    assert torch.allclose(gl[..., :3, 2], -c2w[..., :3, 2])
    assert torch.allclose(gl[..., :3, 1], -c2w[..., :3, 1])
    assert torch.allclose(gl[..., :3, 3], c2w[..., :3, 3])
    # [.., 3, 4] inputs keep their shape
    assert opencv_to_opengl(c2w[..., :3, :]).shape == (1, 3, 3, 4)
    assert torch.equal(to_homogeneous(c2w[..., :3, :]), c2w)


def test_rays_pass_through_pixel_centres():
    h, w = 6, 8
    k = torch.tensor([[10.0, 0, 4.0], [0, 12.0, 3.0], [0, 0, 1]], dtype=torch.float64)
    c2w = look_at_opencv(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    origins, dirs = camera_rays(k, c2w, h, w)
    assert origins.shape == dirs.shape == (h, w, 3)
    assert torch.allclose(dirs.norm(dim=-1), torch.ones(h, w, dtype=torch.float64))
    # project a point along the ray of pixel (row 2, col 5) back: it must land on the pixel centre (5.5, 2.5)
    point = origins[2, 5] + 3.7 * dirs[2, 5]
    cam = torch.linalg.inv(c2w) @ torch.cat([point, torch.ones(1, dtype=torch.float64)])
    uvw = k @ cam[:3]
    assert torch.allclose(uvw[:2] / uvw[2], torch.tensor([5.5, 2.5], dtype=torch.float64))
    # the ray through the principal point is the optical axis (+z of the OpenCV camera)
    k_centre = torch.tensor([[10.0, 0, 4.0], [0, 12.0, 3.0], [0, 0, 1]], dtype=torch.float64)
    _, d = camera_rays(k_centre, c2w, 6, 8)
    mid = (d[2, 3] + d[3, 3] + d[2, 4] + d[3, 4]) / 4
    assert torch.nn.functional.cosine_similarity(mid, c2w[:3, 2], dim=0) > 0.999


def test_plucker_moment_is_orthogonal_and_origin_independent():
    k, c2w = orbit_cameras(1, 2, 8, 10)
    rays = plucker_rays(k.double(), c2w.double(), 8, 10)
    assert rays.shape == (1, 2, 6, 8, 10)
    d, m = rays[:, :, :3], rays[:, :, 3:]
    assert (d * m).sum(2).abs().max() < 1e-9
    # the moment is the same for any point on the ray: (o + t d) x d == o x d
    o = c2w[..., :3, 3].double()[..., :, None, None]
    shifted = torch.cross(o + 2.5 * d, d, dim=2)
    assert torch.allclose(shifted, m, atol=1e-9)


def test_normalize_cameras_invariant_to_similarity():
    _, c2w = orbit_cameras(2, 5, 16, 16, seed=3)
    for reference in ("mean", "first"):
        base, _ = normalize_cameras(c2w.double(), reference)
        moved, scale = normalize_cameras(apply_similarity(c2w, random_rigid(7, scale=3.3)), reference)
        assert torch.allclose(base, moved, atol=1e-9), reference
        # median camera distance to the robust centre is 2
        dist = base[..., :3, 3].norm(dim=-1)
        assert torch.allclose(dist.median(dim=-1).values, torch.full((2,), 2.0, dtype=torch.float64), atol=0.2)


def test_normalize_first_uses_view0_axes_and_mean_is_order_free():
    _, c2w = orbit_cameras(1, 4, 16, 16, seed=5)
    first, _ = normalize_cameras(c2w.double(), "first")
    assert torch.allclose(first[0, 0, :3, :3], torch.eye(3, dtype=torch.float64), atol=1e-6)  # float32 input poses
    perm = torch.tensor([2, 0, 3, 1])
    mean_a, _ = normalize_cameras(c2w.double(), "mean")
    mean_b, _ = normalize_cameras(c2w.double()[:, perm], "mean")
    assert torch.allclose(mean_a[:, perm], mean_b, atol=1e-9)


def test_normalize_cameras_robust_to_outlier_camera():
    _, c2w = orbit_cameras(1, 7, 16, 16, seed=11)
    clean, _ = normalize_cameras(c2w.double())
    outlier = c2w.clone().double()
    outlier[0, 3, :3, 3] = outlier[0, 3, :3, 3] * 50  # one camera 50x farther out
    robust, _ = normalize_cameras(outlier)
    keep = [0, 1, 2, 4, 5, 6]
    # inlier camera centres hardly move (a mean/reference-distance normalisation would shrink them ~10x)
    err = (robust[0, keep, :3, 3] - clean[0, keep, :3, 3]).norm(dim=-1).max()
    assert err < 0.5, err


def test_normalize_degenerate_sets():
    # identical centres (pure rotation): finite output, centres at the origin
    _, c2w = orbit_cameras(1, 3, 8, 8, seed=1)
    c2w[..., :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    out, scale = normalize_cameras(c2w.double())
    assert torch.isfinite(out).all() and torch.allclose(out[..., :3, 3], torch.zeros(3, dtype=torch.float64))
    # a single view
    out, _ = normalize_cameras(c2w[:, :1].double())
    assert torch.isfinite(out).all()


def test_geometric_median_and_mean_rotation():
    pts = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [100, 100, 0]], dtype=torch.float64)
    med = geometric_median(pts)
    assert (med - torch.tensor([0.5, 0.5, 0], dtype=torch.float64)).norm() < 0.7
    _, c2w = orbit_cameras(1, 4, 8, 8, seed=2)
    rots = c2w[0, :, :3, :3].double()
    g = random_rigid(3)[:3, :3]
    assert torch.allclose(mean_rotation(g @ rots), g @ mean_rotation(rots), atol=1e-9)
    r = mean_rotation(rots)
    assert torch.allclose(r.T @ r, torch.eye(3, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda m: m.__setitem__((0, 1, 0, 3), float("nan")), "NaN"),
        (lambda m: m[0, 1, :3, :3].mul_(2.0), "not a rotation"),
        (lambda m: m[0, 1, :3, 0].neg_(), "not a rotation"),  # reflection, det = -1
        (lambda m: m.__setitem__((0, 1, 3, 0), 1.0), "last row"),
    ],
)
def test_validate_cam_to_world_errors_name_the_view(mutate, message):
    _, c2w = orbit_cameras(1, 3, 8, 8)
    mutate(c2w)
    with pytest.raises(CameraError, match=message) as info:
        validate_cam_to_world(c2w)
    assert "(0, 1)" in str(info.value)


def test_validate_intrinsics_errors():
    k, _ = orbit_cameras(1, 2, 8, 8)
    validate_intrinsics(k)
    bad = k.clone()
    bad[0, 1, 0, 0] = -5
    with pytest.raises(CameraError, match="focal"):
        validate_intrinsics(bad)
    bad = k.clone()
    bad[0, 0, 2, 2] = 0
    with pytest.raises(CameraError, match="last row"):
        validate_intrinsics(bad)
    with pytest.raises(CameraError, match=r"\[\.\.\., 3, 3\]"):
        validate_intrinsics(torch.eye(4))
