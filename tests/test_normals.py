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
    sub = scene.subset([3])  # subsets keep their normal files
    assert torch.allclose(sub.load_normals([0], source="files"), exact[1:], equal_nan=True)


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


# ------------------------------------------------------------------------------------------- the probe


def _tiny_model(seed: int = 0):
    from mvfm_nerfstudio.models.build import ModelSpec, build_model

    return build_model(ModelSpec(weights="random", tiny=True, model_seed=seed, device="cpu"))


def test_return_layers_of_mvfm_and_base():
    from conftest import orbit_cameras, randomize_adapters

    model = _tiny_model()
    images = torch.rand(1, 3, 3, 28, 42)
    k, c2w = orbit_cameras(1, 3, 28, 42)
    with torch.no_grad():
        feats, layers = model(images, k, c2w, return_layers=[0, -1])
        base, base_layers = model.forward_base(images, return_layers=[0, 1])
        assert torch.equal(feats, model(images, k, c2w))  # asking for layers changes nothing
        assert [tuple(x.shape) for x in layers] == [(1, 3, 64, 2, 3)] * 2
        for a, b in zip(layers, base_layers):  # untrained adapters reproduce the base model
            assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(layers[-1], feats, atol=1e-5)  # the last block's normed tokens = the features
        randomize_adapters(model)
        _, adapted = model(images, k, c2w, return_layers=[-1])
        assert (adapted[0] - base_layers[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="out of range"):
        model.forward_base(images, return_layers=[5])


def test_head_without_view_interaction_is_a_per_view_head():
    from mvfm_nerfstudio.probes.head import MultiViewNormalHead, NormalHeadConfig

    torch.manual_seed(0)
    feats = [torch.randn(2, 3, 16, 3, 4) for _ in range(2)]
    cfg = NormalHeadConfig(in_dims=(16, 16), hidden_dim=8, num_heads=2, view_interaction=False)
    per_view = MultiViewNormalHead(cfg).eval()
    joint = MultiViewNormalHead(NormalHeadConfig(**{**cfg.__dict__, "view_interaction": True})).eval()
    joint.load_state_dict(per_view.state_dict())  # same weights, only the attention's scope differs
    with torch.no_grad():
        n, kappa = per_view(feats)
        assert n.shape == (2, 3, 3, 12, 16) and kappa.shape == (2, 3, 12, 16) and bool((kappa > 0).all())
        assert torch.allclose(n.norm(dim=2), torch.ones(2, 3, 12, 16), atol=1e-5)
        one_by_one = torch.cat([per_view([f[:, v:v + 1] for f in feats])[0] for v in range(3)], dim=1)
        assert torch.allclose(n, one_by_one, atol=1e-5)
        # with interaction, the other views change a view's output; a single view is the same either way
        assert (joint(feats)[0] - n).abs().max() > 1e-3
        assert torch.allclose(joint([f[:, :1] for f in feats])[0], one_by_one[:, :1], atol=1e-5)


def test_normal_losses_hand_computed():
    from mvfm_nerfstudio.probes.head import normal_loss

    x, y = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    pred = torch.stack([x, x], -1)[:, None]  # [3, 1, 2]
    target = torch.stack([y, torch.full((3,), math.nan)], -1)[:, None]  # second pixel has no ground truth
    assert float(normal_loss(pred, target)) == pytest.approx(math.pi / 2, rel=1e-4)
    k = torch.tensor([[2.0, 5.0]])
    expected = -math.log(5) + 2 * math.pi / 2 + math.log1p(math.exp(-2 * math.pi))
    assert float(normal_loss(pred, target, k)) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="no valid pixel"):
        normal_loss(pred, torch.full_like(target, math.nan))


def test_frames_compose_to_camera_to_world():
    from conftest import orbit_cameras
    from mvfm_nerfstudio.probes.normals import target_from_camera, world_from_target

    _, c2w = orbit_cameras(1, 3, 8, 8)
    for frame in ("camera", "world", "reference"):
        composed = world_from_target(c2w, frame) @ target_from_camera(c2w, frame)
        assert torch.allclose(composed, c2w[..., :3, :3].double(), atol=1e-6), frame
    ref = target_from_camera(c2w, "reference")
    assert torch.allclose(ref[0, 0], torch.eye(3, dtype=torch.float64), atol=1e-6)


@pytest.fixture(scope="module")
def scene24(tmp_path_factory):
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    return make_scene(tiny_config(0, num_views=24), tmp_path_factory.mktemp("n") / "scene24", progress=False)


def test_tiny_training_beats_the_constant_normal_and_eval_reproduces_it(scene24, tmp_path):
    from mvfm_nerfstudio.probes import load_probe, predict_normals
    from mvfm_nerfstudio.scripts.normals import entrypoint

    out = tmp_path / "run"
    entrypoint(["train", "--preset", "tiny-test", "--scene", str(scene24), "--output-dir", str(out),
                "--holdout-every", "4", "--features", "base", "--no-progress"])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    probe, const = metrics["probe"], metrics["constant"]
    # random tiny backbone: the head learns the scene's layout (the ground's tilt in each camera) from weak features
    assert probe["median"] < 0.7 * const["median"]
    assert probe["mean"] < const["mean"] - 1.5
    assert probe["pct_11.25"] > const["pct_11.25"] + 5
    assert metrics["multiview"]["num_correspondences"] > 1000
    assert metrics["multiview"]["gt_mean_disagreement_deg"] < 3  # exact normals: only pixel rounding
    assert metrics["heldout_views"] == [0, 4, 8, 12, 16, 20]
    assert (out / "eval" / "frame_00004_pred.png").is_file() and (out / "eval" / "frame_00004_error.png").is_file()
    assert (out / "tensorboard").is_dir() and sorted(p.name for p in (out / "checkpoints").iterdir())
    head, meta = load_probe(out / "head.safetensors")
    assert (meta["features"], meta["frame"], meta["backbone"]) == ("base", "camera", "dinov2_vits14_reg")
    assert meta["tiny"] == "1"
    # mvfm-normals eval rebuilds the model from the checkpoint and measures the same
    entrypoint(["eval", "--head", str(out / "head.safetensors"), "--output-dir", str(tmp_path / "ev"), "--no-progress"])
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert again["probe"]["mean"] == pytest.approx(probe["mean"], abs=1e-4)
    assert again["constant"]["mean"] == pytest.approx(const["mean"], abs=1e-4)
    # the Python API on a held-out view's set gives unit normals in every frame
    model = _tiny_model()
    scene = load_scene(scene24)
    batch = scene.load_views([4, 5, 3], size=tuple(metrics["image_size"]))
    pred = predict_normals(model, head, batch.images[None], batch.intrinsics[None], batch.cam_to_world[None])
    assert pred.world.shape == (1, 3, 3, *metrics["image_size"])
    assert torch.allclose(pred.camera, world_to_camera_normals(pred.world, batch.cam_to_world[None]), atol=1e-5)
    gt = scene.load_normals([4], size=tuple(metrics["image_size"]))
    assert angular_metrics(angular_error(pred.camera[0, :1], gt))["median"] < const["median"]


def test_resume_continues_exactly(tmp_path):
    from mvfm_nerfstudio.probes import load_probe
    from mvfm_nerfstudio.probes.config import load_normals_preset
    from mvfm_nerfstudio.probes.train import train_normal_probe
    import dataclasses

    base = dataclasses.replace(load_normals_preset("tiny-test"), scene=tiny_scene_path(), steps=4, checkpoint_every=2,
                               evaluate=False, progress=False, tensorboard=False, frame="world")
    full, _ = train_normal_probe(dataclasses.replace(base, output_dir=tmp_path / "full"))
    train_normal_probe(dataclasses.replace(base, output_dir=tmp_path / "part"))
    for p in (tmp_path / "part" / "checkpoints").glob("step-0000004.*"):  # as if killed after step 2's checkpoint
        p.unlink()
    (tmp_path / "part" / "head.safetensors").unlink()
    resumed, _ = train_normal_probe(dataclasses.replace(base, output_dir=tmp_path / "part", resume=True))
    a, meta = load_probe(full)
    b, _ = load_probe(resumed)
    assert meta["frame"] == "world" and meta["step"] == "4"
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_probe_errors_name_the_problem(tmp_path):
    from mvfm_nerfstudio.errors import CheckpointMismatchError
    from mvfm_nerfstudio.probes import load_probe
    from mvfm_nerfstudio.probes.config import load_normals_preset
    from mvfm_nerfstudio.probes.train import train_normal_probe
    import dataclasses

    with pytest.raises(CheckpointMismatchError, match="does not exist"):
        load_probe(tmp_path / "none.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapters.safetensors"), metadata={"format": "other"})
    with pytest.raises(CheckpointMismatchError, match="not a normal head checkpoint"):
        load_probe(tmp_path / "adapters.safetensors")
    bare = copy_scene(tiny_scene_path(), tmp_path / "bare")

    def strip(meta):
        for f in meta["frames"]:
            f.pop("normal_file_path"), f.pop("depth_file_path")

    edit_transforms(bare, strip)
    cfg = dataclasses.replace(load_normals_preset("tiny-test"), scene=bare, output_dir=tmp_path / "o", progress=False)
    with pytest.raises(SceneError, match="no ground-truth normals"):
        train_normal_probe(cfg)
    with pytest.raises(ValueError, match="unknown mvfm-normals preset"):
        load_normals_preset("nope")
