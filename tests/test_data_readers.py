"""Scene readers (transforms.json, COLMAP), PosedScene loading/resizing/undistortion and input validation."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from data_helpers import copy_scene, edit_transforms, tiny_scene_path, write_rgb
from mvfm_nerfstudio.data import (
    PosedScene,
    SceneError,
    load_scene,
    read_colmap_scene,
    read_nerfstudio_scene,
    sample_view_sets,
    split_views,
)
from mvfm_nerfstudio.geometry.cameras import opencv_to_opengl
from mvfm_nerfstudio.geometry.distortion import undistort_pixels

# name: (views, {(H, W)}, observations in colmap_knownposes, mean reprojection error stated in scene.json)
REAL_SCENES = {
    "llff_fern": (20, {(756, 1008)}, 21747, 0.88),
    "dtu_scan24_monosdf": (49, {(384, 384)}, 16353, 0.48),
    "fox": (50, {(960, 540)}, 64600, 0.65),
    "sevenscenes_redkitchen": (50, {(480, 640)}, 8319, 1.58),
}


def track_reprojection_errors(scene, undistort: bool = True) -> torch.Tensor:
    """Per-observation distance between a track's projected 3D point and its (undistorted) pixel."""
    tr = scene.tracks
    w2c = torch.linalg.inv(scene.cam_to_world)[tr.image_ids]  # [M, 4, 4]
    cam = (w2c[:, :3, :3] @ tr.points3d[tr.point_ids].unsqueeze(-1)).squeeze(-1) + w2c[:, :3, 3]
    assert bool((cam[:, 2] > 0).all()), "track points behind their cameras"
    pix = (scene.intrinsics[tr.image_ids] @ cam.unsqueeze(-1)).squeeze(-1)
    xy = pix[:, :2] / pix[:, 2:]
    obs = tr.xy
    if undistort and scene.distortion is not None:
        obs = undistort_pixels(obs, scene.intrinsics[tr.image_ids], scene.distortion[tr.image_ids])
    return (xy - obs).norm(dim=-1)


@pytest.mark.real_data
@pytest.mark.parametrize("name", sorted(REAL_SCENES))
def test_real_scene_loads_with_tracks_that_fit_the_poses(shared_data, name):
    views, sizes, n_obs, stated_err = REAL_SCENES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # COLMAP poses must agree with transforms.json after conversion
        scene = load_scene(shared_data / "scenes" / name)
    assert len(scene) == views
    assert {tuple(s) for s in scene.image_sizes.tolist()} == sizes
    k = scene.intrinsics
    h, w = scene.image_sizes[:, 0].double(), scene.image_sizes[:, 1].double()
    assert bool(((k[:, 0, 2] > 0.25 * w) & (k[:, 0, 2] < 0.75 * w) & (k[:, 1, 2] > 0.25 * h)).all())
    assert bool(((k[:, 0, 0] > 0.3 * w) & (k[:, 0, 0] < 5 * w)).all())
    assert len(scene.tracks) == n_obs
    err = track_reprojection_errors(scene)
    # OpenGL->OpenCV, world-to-camera inversion, pixel centres and undistortion all right: the
    # tracks land where the poses say, at the error stated for the triangulation.
    assert float(err.mean()) < 2.5
    assert abs(float(err.mean()) - stated_err) < 0.15
    assert (scene.depth_paths is not None) == (name == "sevenscenes_redkitchen")


@pytest.mark.real_data
def test_fox_undistortion_is_needed_and_correct(shared_data):
    scene = load_scene(shared_data / "scenes" / "fox")
    assert scene.distortion is not None and scene.image_size(0) == (960, 540)  # portrait
    assert float(track_reprojection_errors(scene, undistort=True).mean()) < 1.0
    assert float(track_reprojection_errors(scene, undistort=False).mean()) > 1.5
    batch = scene.load_views([0, 5], size=(224, 126))
    assert batch.images.shape == (2, 3, 224, 126) and batch.size == (224, 126)
    assert torch.allclose(batch.intrinsics[0, 0, 0], scene.intrinsics[0, 0, 0].float() * 126 / 540)
    assert torch.allclose(batch.intrinsics[0, 1, 2], scene.intrinsics[0, 1, 2].float() * 224 / 960)


@pytest.mark.real_data
def test_colmap_reader_matches_transforms(shared_data):
    root = shared_data / "scenes" / "dtu_scan24_monosdf"
    ns = load_scene(root, tracks=False)
    col = read_colmap_scene(root / "colmap_knownposes", images_dir=root / "images")
    assert [p.name for p in col.image_paths] == [p.name for p in ns.image_paths]
    assert torch.allclose(col.cam_to_world, ns.cam_to_world, atol=1e-5)
    assert torch.allclose(col.intrinsics, ns.intrinsics, atol=1e-4)
    assert load_scene(root / "colmap_knownposes").tracks is not None  # a bare COLMAP folder is detected


def test_generated_scene_reads_both_ways():
    root = tiny_scene_path()
    scene = load_scene(root)
    assert len(scene) == 8 and scene.image_size(0) == (96, 128)
    assert scene.depth_paths is not None and scene.object_id_paths is not None
    assert scene.tracks is not None and float(track_reprojection_errors(scene).max()) < 1e-6
    col = read_colmap_scene(root / "sparse" / "0")
    assert torch.allclose(col.cam_to_world, scene.cam_to_world, atol=1e-9)
    batch = scene.load_views([0, 3], patch_size=14)
    assert batch.size == (84, 126) and batch.images.dtype == torch.float32
    assert torch.allclose(batch.intrinsics[0, 0, 0], scene.intrinsics[0, 0, 0].float() * 126 / 128)
    assert torch.equal(batch.indices, torch.tensor([0, 3]))
    assert scene.load_depth([1], size=(48, 64)).shape == (1, 48, 64)
    xy = torch.tensor([[64.0, 48.0]])
    assert torch.allclose(scene.scale_points(xy, 0, (48, 64)), torch.tensor([[32.0, 24.0]]))


def test_frames_sorted_and_per_frame_intrinsics(tmp_path):
    root = copy_scene(tiny_scene_path(), tmp_path / "s")

    def edit(meta):
        meta["frames"] = meta["frames"][::-1]
        meta["frames"][0]["fl_x"] = 150.0  # per-frame override of the last frame (frame_00007)
        del meta["fl_y"]  # fl_y defaults to fl_x per frame

    edit_transforms(root, edit)
    scene = read_nerfstudio_scene(root / "transforms.json")
    assert [p.name for p in scene.image_paths] == [f"frame_{i:05d}.png" for i in range(8)]  # like nerfstudio
    assert float(scene.intrinsics[7, 0, 0]) == 150.0 and float(scene.intrinsics[7, 1, 1]) == 150.0
    assert float(scene.intrinsics[0, 0, 0]) == pytest.approx(float(scene.intrinsics[0, 1, 1]))


def test_pose_disagreement_with_colmap_warns(tmp_path):
    root = copy_scene(tiny_scene_path(), tmp_path / "s")

    def rotate_first(meta):
        m = np.array(meta["frames"][0]["transform_matrix"])
        a = math.radians(5)
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        m[:3, :3] = rz @ m[:3, :3]
        meta["frames"][0]["transform_matrix"] = m.tolist()

    edit_transforms(root, rotate_first)
    with pytest.warns(UserWarning, match="disagree"):
        load_scene(root)


def test_undistorted_image_puts_a_dot_where_undistort_pixels_says(tmp_path):
    h, w = 60, 80
    ud, vd = 68.3, 50.6  # near a corner, where distortion moves pixels most
    vv, uu = np.mgrid[0:h, 0:w] + 0.5
    blob = np.exp(-((uu - ud) ** 2 + (vv - vd) ** 2) / (2 * 1.2**2))
    write_rgb(tmp_path / "a.png", np.repeat(blob[..., None] * 255, 3, -1))
    k = torch.tensor([[60.0, 0, 40.0], [0, 60.0, 30.0], [0, 0, 1]], dtype=torch.float64)
    dist = torch.tensor([[0.25, 0.05, 0.01, -0.01]], dtype=torch.float64)
    scene = PosedScene("dot", tmp_path, [tmp_path / "a.png"], k[None], torch.eye(4)[None], [[h, w]], dist)
    img = scene.load_image(0)[0].double()
    vv_t, uu_t = torch.from_numpy(vv), torch.from_numpy(uu)
    centroid = torch.stack([(img * uu_t).sum() / img.sum(), (img * vv_t).sum() / img.sum()])
    expected = undistort_pixels(torch.tensor([ud, vd]), k, dist[0])
    assert float((expected - torch.tensor([ud, vd])).norm()) > 2  # distortion matters here
    assert float((centroid - expected).norm()) < 0.3


# ------------------------------------------------------------------------------- validation


def test_corrupt_and_missing_images_are_named(tmp_path):
    root = copy_scene(tiny_scene_path(), tmp_path / "s")
    bad = root / "images" / "frame_00003.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(SceneError, match="frame_00003.png"):
        load_scene(root)
    # a truncated file passes the header check but fails when loaded, still naming the file
    good = (tiny_scene_path() / "images" / "frame_00003.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    scene = load_scene(root)
    with pytest.raises(SceneError, match="frame_00003.png"):
        scene.load_views([3])
    bad.unlink()
    with pytest.raises(SceneError, match="frame_00003.png.*does not exist"):
        load_scene(root)


def test_nan_and_non_rotation_poses_name_the_frame(tmp_path):
    root = copy_scene(tiny_scene_path(), tmp_path / "s")
    edit_transforms(root, lambda m: m["frames"][2]["transform_matrix"][0].__setitem__(1, float("nan")))
    with pytest.raises(SceneError, match="frame 2 .*frame_00002.png.*NaN"):
        load_scene(root)
    root2 = copy_scene(tiny_scene_path(), tmp_path / "s2")

    def scale_pose(meta):
        m = np.array(meta["frames"][5]["transform_matrix"])
        m[:3, :3] *= 1.5
        meta["frames"][5]["transform_matrix"] = m.tolist()

    edit_transforms(root2, scale_pose)
    with pytest.raises(SceneError, match="frame_00005.png.*not a rotation"):
        load_scene(root2)


def test_mismatched_size_empty_scene_and_one_view(tmp_path):
    root = copy_scene(tiny_scene_path(), tmp_path / "s")
    edit_transforms(root, lambda m: m.update(w=100))
    with pytest.raises(SceneError, match="frame_00000.png is 128x96"):
        load_scene(root)
    edit_transforms(root, lambda m: m.update(w=128, frames=[]))
    with pytest.raises(SceneError, match="empty scene"):
        load_scene(root)
    one = load_scene(tiny_scene_path()).subset([4])
    assert len(one) == 1 and one.tracks is not None
    with pytest.raises(SceneError, match="1 view"):
        sample_view_sets(one, num_views=2, min_shared=1, num_sets=1, seed=0)
    with pytest.raises(SceneError, match="1 view"):
        split_views(one)
    with pytest.raises(SceneError, match="neither a Nerfstudio scene"):
        load_scene(tmp_path)


def test_opengl_transform_round_trip(tmp_path):
    """Poses written as OpenGL by the generator come back as the OpenCV poses it rendered with."""
    from mvfm_nerfstudio.data.generator import orbit_cameras, tiny_config

    _, c2w = orbit_cameras(tiny_config(seed=0))
    scene = load_scene(tiny_scene_path())
    assert torch.allclose(scene.cam_to_world, c2w, atol=1e-9)
    meta = json.loads((tiny_scene_path() / "transforms.json").read_text())
    assert np.allclose(meta["frames"][0]["transform_matrix"], opencv_to_opengl(c2w[0]).numpy())
