"""mvfm-features through Nerfstudio: registration, --help, CPU training with the real trainer, the
full-image datamanager, feature_at_ray, and ns-viewer serving a trained run from the feature cache.

One tiny generated scene and one 3-iteration training run are shared by the module (the slow part).
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import free_port
from mvfm_nerfstudio.features import cosine_similarity, heatmap_rgb

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
OPTION_NAMES = (
    "--pipeline.datamanager.features.backbone",
    "--pipeline.datamanager.features.weights",
    "--pipeline.datamanager.features.adapters",
    "--pipeline.datamanager.features.view-grouping",
    "--pipeline.datamanager.features.views-per-set",
    "--pipeline.datamanager.features.feature-resolution",
    "--pipeline.datamanager.features.feature-dim",
    "--pipeline.datamanager.features.cache-dir",
    "--pipeline.datamanager.features.adapt",
    "--pipeline.model.feature-loss",
    "--pipeline.model.feature-loss-mult",
)


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200", **extra)
    env.pop("MVFM_CACHE_DIR", None)
    return env


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    return make_scene(tiny_config(seed=0), tmp_path_factory.mktemp("plugin") / "scene", progress=False)


def _tiny_config(scene: Path, out: Path, cache: Path, iterations: int = 3):
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features_config

    config = mvfm_features_config()
    config.experiment_name = "test"
    config.output_dir = out
    config.max_num_iterations = iterations
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    config.vis = "tensorboard"
    config.viewer.quit_on_train_completion = True
    dm = config.pipeline.datamanager
    dm.data = dm.dataparser.data = scene
    dm.train_num_rays_per_batch = dm.eval_num_rays_per_batch = 128
    f = dm.features
    f.weights, f.tiny, f.feature_resolution, f.feature_dim, f.cache_dir = "random", True, 8, 16, cache
    m = config.pipeline.model
    m.num_nerf_samples_per_ray, m.num_proposal_samples_per_ray = 16, (32, 16)
    m.num_levels, m.log2_hashmap_size, m.max_res = 8, 14, 256
    m.feature_num_levels, m.feature_log2_hashmap_size = 6, 12
    m.eval_num_rays_per_chunk = 1 << 12
    return config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """nerfacto on the CPU is many small ops: one thread is as fast when idle and ~4x faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory):
    """A 3-iteration mvfm-features run through Nerfstudio's Trainer on the CPU."""
    out = tmp_path_factory.mktemp("runs")
    config = _tiny_config(scene, out, out / "feature_cache")
    config.set_timestamp()
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return config, trainer


def test_method_registered_through_entry_points():
    from nerfstudio.plugins.registry import discover_methods

    methods, descriptions = discover_methods()
    assert "mvfm-features" in methods
    assert "feature field" in descriptions["mvfm-features"]
    cfg = methods["mvfm-features"]
    assert type(cfg.pipeline.datamanager).__name__ == "MVFMDataManagerConfig"
    assert "feature_field" in cfg.optimizers


def test_ns_train_help_documents_the_options():
    res = subprocess.run([str(BIN / "ns-train"), "mvfm-features", "--help"], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in OPTION_NAMES:
        assert name in res.stdout, name
    assert "view_grouping" not in res.stdout and "Views the MVFM sees together" in res.stdout


def test_three_iteration_cpu_training_writes_a_checkpoint(trained):
    config, trainer = trained
    ckpts = sorted((config.get_base_dir() / "nerfstudio_models").glob("step-*.ckpt"))
    assert [c.name for c in ckpts] == ["step-000000002.ckpt"]
    state = torch.load(ckpts[0], map_location="cpu", weights_only=True)  # loads without pickle extras
    keys = state["pipeline"].keys()
    assert any(k.startswith("_model.feature_field.") for k in keys)
    assert "_model.feature_display.pca_components" in keys

    pipeline = trainer.pipeline
    store = pipeline.datamanager.feature_store
    assert not store.cache_hit and store.mvfm_forwards > 0 and store.feature_dim == 16
    pipeline.train()
    _, batch = pipeline.datamanager.next_train(3)
    assert batch["feature"].shape == (128, 16) and batch["feature"].dtype == torch.float32
    assert torch.allclose(batch["feature"], store.sample_pixels(batch["indices"]))
    _, loss_dict, metrics = pipeline.get_train_loss_dict(3)
    loss = float(loss_dict["feature_loss"])
    assert math.isfinite(loss) and loss > 0
    assert math.isfinite(float(metrics["feature_cosine"]))
    # the display basis from the cache went into the model (and so into the checkpoint)
    assert torch.allclose(pipeline.model.feature_display.pca_components, store.display_basis.components)


def test_feature_at_ray_matches_the_rendered_pixel(trained):
    _, trainer = trained
    model = trainer.pipeline.model
    cams = trainer.pipeline.datamanager.train_dataset.cameras
    bundle = cams.generate_rays(camera_indices=1, coords=torch.tensor([[40.5, 70.5]]))
    feat = model.feature_at_ray(bundle.origins[0], bundle.directions[0])
    assert feat.shape == (16,) and torch.isfinite(feat).all()
    model.eval()
    with torch.no_grad():
        rendered = model(cams.generate_rays(camera_indices=1, coords=torch.tensor([[40.5, 70.5]]), keep_shape=False))
    model.train()
    assert torch.allclose(feat, rendered["feature"][0], atol=1e-5)
    # with_depth: the same feature and nerfacto's (median) depth of that ray, NaN where it accumulates < 0.5
    feat2, depth = model.feature_at_ray(bundle.origins[0], bundle.directions[0], with_depth=True)
    assert torch.allclose(feat2, feat, atol=1e-5)
    if float(rendered["accumulation"][0]) >= 0.5:
        assert float(depth) == pytest.approx(float(rendered["depth"][0]), rel=1e-4)
    else:
        assert torch.isnan(depth)
    model.set_query(feat)
    with torch.no_grad():
        out = model.get_outputs_for_camera(cams[1:2])
    assert set(out) >= {"feature", "feature_pca", "similarity", "segmentation"}
    assert out["feature_pca"].shape[-1] == 3 and 0 <= float(out["feature_pca"].min()) <= float(out["feature_pca"].max()) <= 1
    # the viewer's similarity is the fixed-scale colour of the cosine; the clicked pixel is the red end (cos 1)
    cos = cosine_similarity(out["feature"], model.feature_display.query)
    assert float(cos[40, 70]) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(out["similarity"], heatmap_rgb(cos[..., 0], -1.0, 1.0))
    model.set_query(None)


def test_full_image_datamanager_serves_feature_maps_from_the_same_cache(trained, scene):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import MVFMFullImageDatamanagerConfig

    config, trainer = trained
    features = config.pipeline.datamanager.features
    dm = MVFMFullImageDatamanagerConfig(dataparser=NerfstudioDataParserConfig(data=scene), features=features).setup(
        device="cpu"
    )
    store = dm.feature_store
    assert store.cache_hit and store.mvfm_forwards == 0  # no distortion: same pixels, same entry as the NeRF run
    assert store.path == trainer.pipeline.datamanager.feature_store.path
    camera, data = dm.next_train(0)
    idx = int(camera.metadata["cam_idx"])
    assert data["feature"].shape == (*store.grid, 16) and data["feature"].dtype == torch.float32
    assert torch.equal(data["feature"], store.feature_map(idx)) and data["feature_grid"] == store.grid
    assert dm.train_dataset.metadata["mvfm_feature_dim"] == 16


@contextlib.contextmanager
def _ns_viewer(config_path: Path, log: Path):
    """``ns-viewer`` on a free port of 127.0.0.1 serving ``config_path``, output to ``log``; yields
    ``(url, first 2000 characters of the page)`` once it answers (within 240 s), stops it afterwards."""
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "ns-viewer"), "--load-config", str(config_path),
             "--viewer.websocket-host", "127.0.0.1", "--viewer.websocket-port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=_env(),
        )
    try:
        status, body, deadline = None, "", time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    status = resp.status
                    body = resp.read(2000).decode(errors="replace")
                break
            except OSError:
                time.sleep(1)
        text = log.read_text()
        assert proc.poll() is None, f"ns-viewer exited early:\n{text[-3000:]}"
        assert status == 200 and "<html" in body.lower(), text[-3000:]
        yield f"http://127.0.0.1:{port}", body
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_ns_viewer_serves_the_trained_run_from_the_feature_cache(trained, tmp_path):
    config, _ = trained
    log = tmp_path / "viewer.log"
    with _ns_viewer(config.get_base_dir() / "config.yml", log):
        text = log.read_text()
        assert "MVFM feature cache: hit" in text and "cache: miss" not in text


def test_per_scene_adaptation_changes_the_cached_features(trained, scene):
    import dataclasses

    import numpy as np

    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import MVFMDataManagerConfig

    config, trainer = trained
    plain = trainer.pipeline.datamanager.feature_store
    features = dataclasses.replace(config.pipeline.datamanager.features, adapt=True, adapt_steps=3, adapt_lr=1e-2)
    dm = MVFMDataManagerConfig(dataparser=dataclasses.replace(config.pipeline.datamanager.dataparser),
                               features=features).setup(device="cpu")
    adapted = dm.feature_store
    assert not adapted.cache_hit and adapted.path != plain.path
    assert (adapted.path / "adapters.safetensors").is_file()
    diff = np.abs(np.asarray(adapted.features, np.float32) - np.asarray(plain.features, np.float32)).max()
    assert diff > 1e-3  # the adapters moved away from their zero (identity) initialisation


def test_demo_fails_fast_without_pretrained_weights(tmp_path):
    res = subprocess.run([str(BIN / "mvfm-demo"), "--output-dir", str(tmp_path / "demo")], capture_output=True,
                         text=True, env=_env(HF_HOME=str(tmp_path / "hf")), timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "not in the Hugging Face cache" in res.stderr and "mvfm-demo --weights random" in res.stderr
    assert not (tmp_path / "demo").exists()  # nothing generated or trained


def test_demo_trains_and_prints_the_viewer_command(scene, tmp_path, capsys):
    from mvfm_nerfstudio.nerfstudio_plugin.demo import DemoArgs, main

    args = DemoArgs(weights="random", tiny=True, iterations=2, scene=scene, output_dir=tmp_path, rays_per_batch=64,
                    feature_resolution=8, feature_dim=8, num_threads=1)
    config_path = main(args)
    assert config_path.is_file() and list((config_path.parent / "nerfstudio_models").glob("step-*.ckpt"))
    assert len(list((tmp_path / "feature_cache").glob("*/meta.json"))) == 1
    out = capsys.readouterr().out
    assert f"ns-viewer --load-config {config_path} --viewer.websocket-host 127.0.0.1" in out
