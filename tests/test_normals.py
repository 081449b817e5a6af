"""Surface normals: depth -> normals on analytic surfaces, metrics, ground truth of scenes, the probe."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from data_helpers import copy_scene, edit_transforms, tiny_scene_path
from mvfm_nerfstudio.data import load_scene
from mvfm_nerfstudio.errors import SceneError
from mvfm_nerfstudio.geometry.normals import (
    angular_error,
    angular_metrics,
    camera_to_world_normals,
    normals_from_depth,
    normals_to_rgb,
    world_to_camera_normals,
)

K = torch.tensor([[100.0, 0, 64.0], [0, 100.0, 48.0], [0, 0, 1]], dtype=torch.float64)
H, W = 96, 128


def _rays() -> torch.Tensor:
    """Camera-frame ray directions with unit z ``[H, W, 3]`` through the pixel centres of K."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                          indexing="ij")
    return torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)


def test_tilted_plane_depth_gives_its_normal_exactly():
    n = torch.tensor([0.3, -0.4, -1.0], dtype=torch.float64)
    n = n / n.norm()  # faces the camera (n_z < 0)
    d = -3.0  # plane n . X = d, in front of the camera
    z = d / (_rays() @ n)  # z-depth where each ray meets the plane
    assert bool((z > 0).all())
    est = normals_from_depth(z.float(), K)
    err = angular_error(est, n.float()[:, None, None].expand(3, H, W))
    assert torch.isfinite(err).all()  # no discontinuity, every pixel has a normal (borders one-sided)
    assert float(err.max()) < 0.05


def test_sphere_depth_gives_radial_normals():
    c, r = torch.tensor([0.2, -0.1, 5.0], dtype=torch.float64), 2.0
    d = _rays()
    # |t d - c|^2 = r^2, nearest root; z-depth = t since d_z = 1
    a, b, cc = (d * d).sum(-1), -2 * (d @ c), (c @ c) - r * r
    disc = b * b - 4 * a * cc
    hit = disc > 0
    t = (-b - disc.clamp(min=0).sqrt()) / (2 * a)
    z = torch.where(hit, t, torch.full_like(t, math.nan))
    truth = ((t[..., None] * d - c) / r).permute(2, 0, 1)
    est = normals_from_depth(z.float(), K)
    err = angular_error(est, truth.float())
    # away from the silhouette (where the surface turns away and the depth gradient blows up)
    facing = (-(truth * d.permute(2, 0, 1)).sum(0) / d.norm(dim=-1)) > 0.5
    inner = hit & facing
    assert inner.sum() > 1000
    assert torch.isfinite(err[inner]).all()
    assert float(err[inner].mean()) < 0.1 and float(err[inner].max()) < 1.0
    assert not torch.isfinite(est[0][~hit]).any()  # no normal where there is no depth


def test_depth_discontinuity_is_masked_not_differenced():
    z = torch.full((H, W), 2.0)
    z[:, W // 2:] = 4.0  # two frontal planes, a 100 % jump between columns 63 and 64
    facing = torch.tensor([0.0, 0.0, -1.0])[:, None, None].expand(3, H, W)
    err = angular_error(normals_from_depth(z, K), facing)
    assert torch.isfinite(err).all() and float(err.max()) < 1e-3  # one-sided differences at the step
    err_unmasked = angular_error(normals_from_depth(z, K, max_rel_jump=10.0), facing)
    assert float(err_unmasked[:, W // 2 - 1: W // 2 + 1].min()) > 45  # differencing across the step is wrong
    # a pixel whose both x-neighbours are across steps has no normal
    z2 = torch.full((H, W), 2.0)
    z2[:, 10] = 3.0
    est = normals_from_depth(z2, K)
    assert not torch.isfinite(est[:, :, 10]).any() and torch.isfinite(est[:, :, 9]).all()


def test_angular_error_and_metrics_hand_computed():
    x = torch.tensor([1.0, 0, 0])
    pred = torch.stack([x, x, x, -x, 2 * x], 1)[:, :, None]  # [3, 5, 1]
    gt = torch.stack([torch.tensor([0, 1.0, 0]), torch.tensor([1.0, 1, 0]), x, x, x], 1)[:, :, None]
    assert angular_error(pred, gt)[:, 0].tolist() == pytest.approx([90, 45, 0, 180, 0], abs=1e-5)
    tiny = torch.tensor([1.0, 1e-6, 0])  # atan2 keeps tiny angles (acos would give 0)
    assert float(angular_error(tiny, x, dim=0)) == pytest.approx(math.degrees(1e-6), rel=1e-3)
    assert math.isnan(float(angular_error(torch.zeros(3), x, dim=0)))
    m = angular_metrics(torch.tensor([0.0, 10.0, 20.0, 40.0, math.nan]))
    assert m["mean"] == pytest.approx(17.5)
    assert m["median"] == pytest.approx(15.0)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 100 + 400 + 1600) / 4))
    assert (m["pct_11.25"], m["pct_22.5"], m["pct_30"]) == (50.0, 75.0, 75.0)
    assert m["num_pixels"] == 4
    with pytest.raises(ValueError, match="no valid pixel"):
        angular_metrics(torch.full((3,), math.nan))


def test_frames_and_rgb_coding():
    from conftest import look_at_opencv

    c2w = look_at_opencv(torch.tensor([3.0, 1.0, 2.0]), torch.zeros(3)).double()
    n = torch.nn.functional.normalize(torch.randn(3, 4, 5, dtype=torch.float64), dim=0)
    back = world_to_camera_normals(camera_to_world_normals(n, c2w), c2w)
    assert torch.allclose(back, n, atol=1e-12)
    # the camera's forward axis in world coordinates is camera-frame (0, 0, 1)
    fwd = camera_to_world_normals(torch.tensor([0, 0, 1.0], dtype=torch.float64)[:, None, None], c2w)[:, 0, 0]
    assert torch.allclose(fwd, c2w[:3, 2])
    facing = torch.tensor([0, 0, -1.0])[:, None, None].expand(3, 2, 2).clone()
    facing[:, 0, 0] = math.nan
    rgb = normals_to_rgb(facing)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 2, 3)
    assert rgb[1, 1].tolist() == [128, 128, 255] and rgb[0, 0].tolist() == [0, 0, 0]


def test_generated_scene_normals_files_agree_with_depth():
    scene = load_scene(tiny_scene_path())
    meta = json.loads((tiny_scene_path() / "transforms.json").read_text())
    assert meta["mvfm_generator"]["version"] >= 2 and "normal_file_path" in meta["frames"][0]
    exact = scene.load_normals([0, 3], frame="camera", source="files")
    assert exact.shape == (2, 3, 96, 128)
    ids = scene.load_object_ids([0, 3])
    assert torch.equal(torch.isfinite(exact[:, 0]), ids > 0)  # a normal exactly where there is a surface
    derived = scene.load_normals([0, 3], frame="camera", source="depth", smooth_radius=0)
    m = angular_metrics(angular_error(derived, exact))
    assert m["median"] < 0.5 and m["pct_11.25"] > 95  # 1 mm depth steps and object edges only
    world = scene.load_normals([0, 3], frame="world")
    assert torch.allclose(camera_to_world_normals(exact, scene.cam_to_world[[0, 3]]), world, atol=1e-5,
                          equal_nan=True)
    # facing the camera: camera-frame normal . viewing ray < 0
    assert float(exact[:, 2][torch.isfinite(exact[:, 2])].max()) < 0.3
    small = scene.load_normals([0], size=(48, 64))
    assert small.shape == (1, 3, 48, 64)


def test_real_scene_normals_from_depth(shared_data):
    scene = load_scene(shared_data / "scenes" / "sevenscenes_redkitchen", tracks=False)
    n = scene.load_normals([0], size=(120, 160))
    valid = torch.isfinite(n[0, 0])
    assert valid.float().mean() > 0.7
    assert torch.allclose(n[0][:, valid].norm(dim=0), torch.ones(int(valid.sum())), atol=1e-4)


def test_normals_bad_input_errors(tmp_path):
    src = tiny_scene_path()
    # no normal files and no depth
    bare = copy_scene(src, tmp_path / "bare")

    def strip(meta):
        for f in meta["frames"]:
            f.pop("normal_file_path"), f.pop("depth_file_path")

    edit_transforms(bare, strip)
    scene = load_scene(bare, tracks=False)
    with pytest.raises(SceneError, match="neither normal files nor depth maps"):
        scene.load_normals([0])
    with pytest.raises(SceneError, match="has no normal files"):
        scene.load_normals([0], source="files")
    # normal file of the wrong size
    bad = copy_scene(src, tmp_path / "bad")
    np.save(bad / "normals" / "frame_00000.npy", np.zeros((10, 10, 3), np.float16) + np.float16(0.577))
    scene = load_scene(bad, tracks=False)
    with pytest.raises(SceneError, match="must have the image's size"):
        scene.load_normals([0])
    np.save(bad / "normals" / "frame_00000.npy", np.full((96, 128, 3), 200, np.float32))
    with pytest.raises(SceneError, match="not unit length"):
        scene.load_normals([0])
    with pytest.raises(ValueError, match="must be a \\[H, W\\]"):
        normals_from_depth(torch.zeros(2, 2, 2, 2), K)
