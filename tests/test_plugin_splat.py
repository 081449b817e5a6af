"""``mvfm-splat``: entry point, camera convention, densification carrying latents, ray queries, CPU training."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("nerfstudio")

from nerfstudio.cameras.cameras import Cameras  # noqa: E402
from nerfstudio.data.scene_box import SceneBox  # noqa: E402
from nerfstudio.engine.optimizers import Optimizers  # noqa: E402

from mvfm_nerfstudio.features import fit_pca  # noqa: E402
from mvfm_nerfstudio.geometry.cameras import invert_pose, opencv_to_opengl, opengl_to_opencv  # noqa: E402
from mvfm_nerfstudio.geometry.feature_grid import resize_map  # noqa: E402
from mvfm_nerfstudio.nerfstudio_plugin.feature_head import DISPLAY_BASIS_KEY, FEATURE_DIM_KEY  # noqa: E402
from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat_config  # noqa: E402
from mvfm_nerfstudio.nerfstudio_plugin.splat_model import MVFMSplatModel, MVFMSplatModelConfig  # noqa: E402

from conftest import look_at_opencv  # noqa: E402

DIM = 8


def make_model(seed_points=None, **overrides) -> MVFMSplatModel:
    torch.manual_seed(0)
    kw = dict(num_random=300, random_scale=2.0, sh_degree=1, background_color="black", latent_dim=6,
              decoder_hidden_dim=16, num_downscales=0)
    kw.update(overrides)
    basis = fit_pca(torch.randn(500, DIM), 3)
    model = MVFMSplatModelConfig(**kw).setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=2,
        metadata={FEATURE_DIM_KEY: DIM, DISPLAY_BASIS_KEY: basis.state()}, seed_points=seed_points,
    )
    return model


def camera_at(center, target=(0.0, 0.0, 0.0), width=32, height=24, focal=30.0) -> Cameras:
    c2w_cv = look_at_opencv(torch.tensor(center), torch.tensor(target))
    c2w_gl = opencv_to_opengl(c2w_cv)[:3]
    return Cameras(camera_to_worlds=c2w_gl[None], fx=focal, fy=focal, cx=width / 2, cy=height / 2, width=width,
                   height=height)


def optimizers_for(model) -> Optimizers:
    return Optimizers(mvfm_splat_config().optimizers, model.get_param_groups())


def test_entry_point_registers_mvfm_splat():
    from importlib.metadata import entry_points

    from nerfstudio.plugins.types import MethodSpecification

    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import MVFMFullImageDatamanagerConfig

    eps = {ep.name: ep for ep in entry_points(group="nerfstudio.method_configs")}
    assert "mvfm-splat" in eps
    spec = eps["mvfm-splat"].load()
    assert isinstance(spec, MethodSpecification)
    assert isinstance(spec.config.pipeline.model, MVFMSplatModelConfig)
    assert isinstance(spec.config.pipeline.datamanager, MVFMFullImageDatamanagerConfig)


def test_param_groups_all_have_optimizers_and_latents_are_gaussian_params():
    model = make_model()
    groups = model.get_param_groups()
    assert {"latents", "feature_decoder", "means"} <= set(groups)
    assert set(groups) <= set(mvfm_splat_config().optimizers)
    assert model.gauss_params["latents"].shape == (300, 6)
    assert set(model.strategy_state) >= {"grad2d", "count"}


def test_opengl_camera_converts_to_opencv_viewmat():
    cam = camera_at((3.0, 0.5, 1.0), target=(0.2, -0.1, 0.3))
    viewmat = invert_pose(opengl_to_opencv(cam.camera_to_worlds[0]))
    target_cam = viewmat @ torch.tensor([0.2, -0.1, 0.3, 1.0])
    assert abs(float(target_cam[0])) < 1e-5 and abs(float(target_cam[1])) < 1e-5 and float(target_cam[2]) > 0
    centre_cam = viewmat @ torch.tensor([3.0, 0.5, 1.0, 1.0])
    torch.testing.assert_close(centre_cam[:3], torch.zeros(3), atol=1e-5, rtol=0)


def test_render_places_a_gaussian_where_the_camera_sees_it():
    model = make_model()
    model.eval()
    point = torch.tensor([0.3, -0.2, 0.1])
    with torch.no_grad():
        model.gauss_params["means"].data[:] = point + 5.0  # everything else far away, outside the view
        model.gauss_params["means"].data[0] = point
        model.gauss_params["scales"].data[0] = math.log(0.05)
        model.gauss_params["opacities"].data[0] = 5.0
    cam = camera_at((2.0, 1.0, 1.0), target=tuple(point.tolist()), width=33, height=25)
    out = model.get_outputs_for_camera(cam)
    assert set(out) >= {"rgb", "depth", "accumulation", "feature", "feature_pca"}
    assert out["feature"].shape == (25, 33, DIM) and out["feature_pca"].shape == (25, 33, 3)
    acc = out["accumulation"][..., 0]
    peak = divmod(int(acc.argmax()), 33)
    assert peak == (12, 16) and float(acc.max()) > 0.9  # the principal point: the camera looks at the Gaussian
    distance = float((torch.tensor([2.0, 1.0, 1.0]) - point).norm())
    assert abs(float(out["depth"][12, 16, 0]) - distance) < 1e-3


def densify_once(model, step=20, before_refine=None):
    """One training step (the trainer's order: forward, backward, optimiser step, densification) with refinement
    due at ``step``; ``before_refine()`` runs just before the densification. Returns the optimisers and camera."""
    model.train()
    opts = optimizers_for(model)
    model.step_cb(opts, step)
    cam = camera_at((2.5, 0.0, 0.5), width=32, height=24)
    cam.metadata = {"cam_idx": 0}
    out = model.get_outputs(cam)
    (out["rgb"].mean() + out["feature"].pow(2).mean()).backward()
    opts.optimizer_step_all()
    if before_refine is not None:
        before_refine()
    model.step_post_backward(step)
    return opts, cam


def test_gaussian_cap_stops_growth_but_not_pruning():
    model = make_model(warmup_length=0, refine_every=10, densify_grad_thresh=1e-12, max_num_gaussians=300,
                       cull_alpha_thresh=0.01)
    with torch.no_grad():
        model.gauss_params["opacities"].data[:5] = -20.0
    densify_once(model)
    assert model.num_points == 295 and model.latents.shape[0] == 295
    uncapped = make_model(warmup_length=0, refine_every=10, densify_grad_thresh=1e-12, max_num_gaussians_cpu=None,
                          cull_alpha_thresh=0.01)
    densify_once(uncapped)
    assert uncapped.num_points > 500


def test_densification_carries_latents_and_optimizer_state():
    model = make_model(warmup_length=0, refine_every=10, densify_grad_thresh=1e-12, use_absgrad=True)
    with torch.no_grad():
        model.gauss_params["latents"].data = torch.arange(300 * 6, dtype=torch.float32).reshape(300, 6)
        model.gauss_params["opacities"].data[7] = -20.0  # below cull_alpha_thresh: pruned
    scale = torch.exp(model.gauss_params["scales"].detach()).amax(-1)
    model.strategy.grow_scale3d = float(scale.median())  # half duplicated, half split
    before = {}
    opts, cam = densify_once(model, before_refine=lambda: before.update(latents=model.latents.detach().clone()))
    old = before["latents"]
    n_before = old.shape[0]
    p = model.gauss_params
    n_after = p["means"].shape[0]
    assert n_after != n_before
    assert all(v.shape[0] == n_after for v in p.values())
    latents = p["latents"].detach()
    # every latent is a copy of an old one: clone/split copy it, prune removes it
    matches = (latents[:, None, :] == old[None, :, :]).all(-1)  # [new, old]
    assert bool(matches.any(1).all())
    copies = matches.sum(0)
    assert int(copies[7]) == 0, "the transparent Gaussian must be pruned with its latent"
    assert int((copies >= 2).sum()) > 0, "some Gaussians must have been cloned or split"
    assert int(copies.sum()) == n_after
    # the optimiser follows: same tensor, state resized
    opt = opts.optimizers["latents"]
    assert opt.param_groups[0]["params"][0] is p["latents"]
    assert opt.state[p["latents"]]["exp_avg"].shape == latents.shape
    # and training continues
    opts.zero_grad_all()
    out = model.get_outputs(cam)
    (out["rgb"].mean() + out["feature"].mean()).backward()
    opts.optimizer_step_all()
    assert p["latents"].grad is not None and p["latents"].grad.shape == latents.shape
    # a fresh model (other Gaussian count) loads the densified state: splatfacto resizes every gauss_params entry
    fresh = make_model()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.latents, model.latents)


def test_seeded_initialisation_runs_on_cpu():
    xyz = torch.rand(40, 3) * 2 - 1
    rgb = torch.randint(0, 256, (40, 3), dtype=torch.uint8)
    model = make_model(seed_points=(xyz, rgb))
    torch.testing.assert_close(model.means.detach(), xyz)
    from nerfstudio.models.splatfacto import SH2RGB

    torch.testing.assert_close(SH2RGB(model.features_dc.detach()), rgb.float() / 255, atol=1e-5, rtol=0)
    assert model.gauss_params["latents"].shape == (40, 6) and model.features_rest.shape == (40, 3, 3)


def test_ply_seed_points_are_read_without_open3d(tmp_path):
    import numpy as np
    from plyfile import PlyData, PlyElement

    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import NerfstudioPly, read_ply_points

    xyz = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    rgb = np.arange(60, dtype=np.uint8).reshape(20, 3)
    ascii_path = tmp_path / "points.ply"  # the layout ns-process-data (create_ply_from_colmap) writes
    lines = [f"{x:.6f} {y:.6f} {z:.6f} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(xyz, rgb)]
    ascii_path.write_text("ply\nformat ascii 1.0\nelement vertex 20\nproperty float x\nproperty float y\n"
                          "property float z\nproperty uint8 red\nproperty uint8 green\nproperty uint8 blue\n"
                          "end_header\n" + "\n".join(lines) + "\n")
    points = read_ply_points(ascii_path)
    np.testing.assert_allclose(points["xyz"], xyz, atol=1e-6)
    np.testing.assert_array_equal(points["rgb"], rgb)
    binary_path = tmp_path / "no_colour.ply"
    vertices = np.array([tuple(p) for p in xyz], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(binary_path))
    points = read_ply_points(binary_path)
    assert points["xyz"].shape == (20, 3) and points["rgb"].shape == (0, 3)
    # the dataparser hook applies Nerfstudio's transform and scale, like its open3d version
    transform = torch.tensor([[0.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.0, 3.0]])
    out = NerfstudioPly._load_3D_points(None, ascii_path, transform, 0.5)
    expected = (torch.from_numpy(xyz) @ transform[:, :3].T + transform[:, 3]) * 0.5
    torch.testing.assert_close(out["points3D_xyz"], expected, atol=1e-5, rtol=1e-5)
    assert out["points3D_rgb"].dtype == torch.uint8


def test_feature_at_ray_matches_the_rendered_pixel():
    model = make_model(max_gaussians_per_pixel=None)
    model.eval()
    cam = camera_at((2.0, 0.3, 0.8), width=33, height=25, focal=30.0)
    out = model.get_outputs_for_camera(cam)
    c2w = cam.camera_to_worlds[0]
    f = model.feature_at_ray(c2w[:, 3], -c2w[:, 2], focal=30.0)  # OpenGL: the camera looks along -z
    centre = out["feature"][12, 16]
    assert f.shape == (DIM,)
    # not bit-exact: gsplat's projection clamps Jacobians to a margin that depends on the image size
    torch.testing.assert_close(f, centre, atol=2e-3, rtol=0)
    assert float((f - out["feature"][0, 0]).abs().max()) > 1e-2  # a different pixel differs
    # with_depth: the same feature, and the centre pixel's z-depth (= distance along the optical axis); within 5 %:
    # the same Jacobian clamping changes the compositing weights a little, and depth mixes Gaussians at several
    # distances (2 % measured)
    f2, depth = model.feature_at_ray(c2w[:, 3], -c2w[:, 2], focal=30.0, with_depth=True)
    torch.testing.assert_close(f2, f, atol=1e-6, rtol=0)
    assert float(out["accumulation"][12, 16]) >= 0.5
    assert float(depth) == pytest.approx(float(out["depth"][12, 16]), rel=0.05)
    assert float(out["depth"].max() - out["depth"].min()) > 0.2  # so 5 % of the depth is a real check
    # a ray into empty space has no surface: NaN
    _, away = model.feature_at_ray(c2w[:, 3], c2w[:, 2], focal=30.0, with_depth=True)
    assert torch.isnan(away)
    with pytest.raises(ValueError, match="non-zero direction"):
        model.feature_at_ray(c2w[:, 3], torch.zeros(3))


def test_feature_loss_compares_at_pixel_centre_correct_positions():
    # a ramp in pixel-centre x coordinates resampled to the grid gives each interior cell's centre x
    width, height, grid = 64, 32, (4, 8)
    xs = (torch.arange(width) + 0.5).float()
    ramp = xs[None, :, None].expand(height, width, 1)
    cells = resize_map(ramp, grid)[..., 0]
    expected = (torch.arange(grid[1]) + 0.5) * width / grid[1]
    torch.testing.assert_close(cells[1:-1, 1:-1], expected[1:-1].expand(grid[0] - 2, -1), atol=1e-4, rtol=0)

    model = make_model(feature_loss_resolution="grid")
    model.eval()
    out = model.get_outputs_for_camera(camera_at((2.0, 0.3, 0.8)))
    target = resize_map(out["feature"], grid)
    batch = {"image": out["rgb"], "feature": target}
    assert float(model.get_loss_dict(out, batch)["feature_loss"]) < 1e-10
    batch["feature"] = target + 1.0
    assert abs(float(model.get_loss_dict(out, batch)["feature_loss"]) - 1.0) < 1e-4
    model.config.feature_loss_resolution = "render"
    assert torch.isfinite(model.get_loss_dict(out, batch)["feature_loss"])


@pytest.mark.slow
def test_ns_train_three_iterations_on_cpu(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    scene = make_scene(tiny_config(seed=1, num_views=6, height=48, width=64, write_colmap=False), tmp_path / "scene",
                       progress=False)
    ns_train = Path(sys.executable).with_name("ns-train")
    cmd = [
        str(ns_train), "mvfm-splat", "--machine.device-type", "cpu", "--vis", "tensorboard",
        "--viewer.websocket-host", "127.0.0.1", "--output-dir", str(tmp_path / "out"), "--timestamp", "run",
        "--max-num-iterations", "3", "--steps-per-save", "100", "--logging.steps-per-log", "1",
        "--pipeline.datamanager.features.weights", "random", "--pipeline.datamanager.features.tiny", "True",
        "--pipeline.datamanager.features.feature-resolution", "8", "--pipeline.datamanager.features.feature-dim",
        "16", "--pipeline.datamanager.features.cache-dir", str(tmp_path / "cache"),
        "--pipeline.model.num-random", "2000",
        "nerfstudio-data", "--data", str(scene),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = (tmp_path / "out").glob("*/mvfm-splat/run")
    ckpts = sorted((run / "nerfstudio_models").glob("*.ckpt"))
    assert ckpts, f"no checkpoint in {run}"
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)  # loadable without pickle
    pipeline = state["pipeline"]
    n = pipeline["_model.gauss_params.means"].shape[0]
    latent_dim = MVFMSplatModelConfig().latent_dim
    assert pipeline["_model.gauss_params.latents"].shape == (n, latent_dim)
    assert 3 + latent_dim in (16, 32) and 4 + latent_dim in (17, 33)  # channel counts gsplat does not pad
    ea = EventAccumulator(str(run))
    ea.Reload()
    losses = [e.value for e in ea.Scalars("Train Loss Dict/feature_loss")]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses), losses
