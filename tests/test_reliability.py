"""Reliability (issue 12): corrupt caches, killed runs, run folders, resume fallback, user-facing errors.

Every test here failed on the code before the fix (docs/reliability.md has the table). Tiny random backbones
and small generated images: seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import orbit_cameras
from mvfm_nerfstudio.feature_store import FeatureStore, FeatureStoreConfig, ViewSource

N, H, W = 4, 30, 40


def _views(root: Path, n: int = N) -> ViewSource:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = root / f"img{i}.png"
        Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    k, c2w = orbit_cameras(1, n, H, W, seed=1)

    def load(i):
        return torch.from_numpy(np.array(Image.open(paths[i]))).float() / 255

    return ViewSource(paths, torch.tensor([[H, W]] * n), k[0].double(), c2w[0].double(), load, scene_name="rel")


def _config(root: Path, **kw) -> FeatureStoreConfig:
    base = dict(weights="random", tiny=True, feature_resolution=4, feature_dim=4, views_per_set=2,
                multi_view=False, cache_dir=root / "cache")
    return FeatureStoreConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- 3, 4, 7: the cache


def _truncate(path: Path, keep: int = -100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _nan_features(path: Path) -> None:
    feats = np.load(path, mmap_mode="r+")
    feats[1, 0, 0, 0] = np.nan
    feats.flush()


def _zero_features(path: Path) -> None:
    feats = np.load(path, mmap_mode="r+")
    feats[:] = 0
    feats.flush()


@pytest.mark.parametrize("damage", ["truncate-features", "truncate-meta", "delete-bases", "nan-features",
                                    "zero-features"])
def test_corrupt_cache_entry_is_reported_moved_aside_and_recomputed(tmp_path, capsys, damage):
    views = _views(tmp_path)
    first = FeatureStore(_config(tmp_path), views).prepare()
    reference = np.array(first.features)
    entry = first.path
    {"truncate-features": lambda: _truncate(entry / "features.npy"),
     "truncate-meta": lambda: _truncate(entry / "meta.json", 20),
     "delete-bases": lambda: (entry / "bases.safetensors").unlink(),
     "nan-features": lambda: _nan_features(entry / "features.npy"),
     "zero-features": lambda: _zero_features(entry / "features.npy")}[damage]()
    capsys.readouterr()
    again = FeatureStore(_config(tmp_path), views).prepare()
    out = capsys.readouterr().out.replace("\n", " ")
    assert "corrupt entry" in out and entry.name in out and "recomputing" in out
    assert not again.cache_hit and again.mvfm_forwards > 0
    np.testing.assert_array_equal(np.array(again.features), reference)  # recomputed, same features
    aside = [p for p in entry.parent.iterdir() if p.name.startswith(entry.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].is_dir()
    hit = FeatureStore(_config(tmp_path), views).prepare()  # the recomputed entry verifies
    assert hit.cache_hit


def test_stale_scratch_of_a_killed_extraction_is_removed(tmp_path):
    views = _views(tmp_path)
    store = FeatureStore(_config(tmp_path), views)
    entry = store.entry_path()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale_dir = entry.parent / f".{entry.name}.partial-{dead.pid}"
    live_dir = entry.parent / f".{entry.name}.partial-{os.getppid()}"  # a running process: kept
    for d in (stale_dir, live_dir):
        (d / "sum.npy").parent.mkdir(parents=True)
        (d / "sum.npy").write_bytes(b"0" * 1000)
    entry.mkdir(parents=True)
    stale_tmp = entry / f".features.npy.{dead.pid}.abc123_x.tmp"
    legacy_old, legacy_new = entry / ".features.npy.k2j4h5g6.tmp", entry / ".meta.json.a1b2c3d4.tmp"  # no pid
    for f in (stale_tmp, legacy_old, legacy_new):
        f.write_bytes(b"0" * 1000)
    os.utime(legacy_old, (0, 0))  # a pid-less temporary file from 1970: stale
    store.prepare()
    assert not stale_dir.exists() and not stale_tmp.exists() and not legacy_old.exists()
    assert live_dir.exists() and legacy_new.exists()
    assert store.features is not None


def test_atomic_writes_name_their_process(tmp_path):
    from mvfm_nerfstudio.utils.io import atomic_path

    with atomic_path(tmp_path / "x.bin") as tmp:
        assert f".x.bin.{os.getpid()}." in tmp.name
        tmp.write_bytes(b"1")


# ---------------------------------------------------------------------------------------------- 1: viewer exposure

import mvfm_nerfstudio  # noqa: E402

ROOT = Path(mvfm_nerfstudio.__file__).resolve().parents[1]  # the checkout whose package is tested (docs beside it)


def test_both_methods_serve_the_viewer_on_localhost_only():
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features, mvfm_features_config
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat, mvfm_splat_config

    for config in (mvfm_features_config(), mvfm_splat_config(), mvfm_features.config, mvfm_splat.config):
        assert config.viewer.websocket_host == "127.0.0.1"


def _doc_commands(text: str, program: str):
    """Each ``program ...`` command of a doc: up to the end of its line, following ``\\`` continuations."""
    joined = text.replace("\\\n", " ")
    for line in joined.splitlines():
        start = line.find(program + " ")
        while start >= 0:
            yield line[start:].split("`")[0]
            start = line.find(program + " ", start + 1)


def test_every_documented_viewer_command_uses_localhost():
    if not (ROOT / "README.md").is_file():
        pytest.skip("docs are not beside the installed package")
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    seen = 0
    for doc in docs:
        text = doc.read_text()
        for cmd in _doc_commands(text, "ns-viewer --load-config"):
            seen += 1
            assert "--viewer.websocket-host 127.0.0.1" in cmd, (doc.name, cmd)
        for cmd in _doc_commands(text, "--viewer.websocket-host"):
            if "0.0.0.0" in cmd:  # only the paragraph that says what opening it exposes
                assert doc.name == "nerfstudio.md" and "## Viewer exposure" in text, (doc.name, cmd)
    assert seen >= 5


# ---------------------------------------------------------------------------------------------- 2, 4, 6: mvfm-train

from _mvfm_training_helpers import tiny_config  # noqa: E402
from data_helpers import tiny_scene_path  # noqa: E402

from mvfm_nerfstudio.training import Trainer  # noqa: E402


def _errors(name: str):
    """An error type of mvfm_nerfstudio.errors, looked up when a test runs (the code before the fix lacked some)."""
    import mvfm_nerfstudio.errors as errors

    return getattr(errors, name)


def _train(out: Path, **kw):
    base = dict(steps=2, checkpoint_every=1, keep_checkpoints=2, eval_sets=0)
    return Trainer(tiny_config(tiny_scene_path(0), out, **{**base, **kw})).train()


def test_a_non_empty_run_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    _train(out, steps=4)
    first = (out / "adapters.safetensors").read_bytes()
    with pytest.raises(_errors("RunFolderError"), match="not empty.*--resume.*--overwrite"):
        _train(out, steps=2, lr=3e-3)
    assert (out / "adapters.safetensors").read_bytes() == first  # nothing of the earlier run was touched
    _train(out, steps=2, lr=3e-3, overwrite=True)  # explicit: the earlier run's outputs are replaced ...
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    # ... so rotation keeps the NEW run's checkpoints (before: the old run's step 3 and 4 survived)
    assert ckpts == [f"step-000000{s}.{e}" for s in (1, 2) for e in ("safetensors", "state.pt")]
    assert json.loads((out / "config.json").read_text())["lr"] == 3e-3


def test_resume_refuses_a_changed_configuration_and_lists_the_fields(tmp_path):
    out = tmp_path / "run"
    _train(out, steps=2)
    changed = r"(?s)another configuration.*lr: 0\.001 -> 0\.003.*seed: 0 -> 5"
    with pytest.raises(_errors("RunFolderError"), match=changed):
        _train(out, steps=3, lr=3e-3, seed=5, resume=True)
    resumed = Trainer(tiny_config(tiny_scene_path(0), out, steps=3, checkpoint_every=1, eval_sets=0, resume=True,
                                  num_threads=1, progress=False))  # run-time fields may differ
    resumed.setup()
    assert resumed.step == 2


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, steps=2)
    latest = out / "checkpoints" / "step-0000002.state.pt"
    latest.write_bytes(latest.read_bytes()[:200])  # a checkpoint truncated by a crash
    capsys.readouterr()
    trainer = Trainer(tiny_config(tiny_scene_path(0), out, steps=3, checkpoint_every=1, keep_checkpoints=2,
                                  eval_sets=0, resume=True)).setup()
    said = capsys.readouterr().out
    assert trainer.step == 1
    assert "step-0000002.state.pt does not verify" in said and "falling back to step-0000001.safetensors" in said
    assert not latest.exists() and any(p.name.startswith("step-0000002.state.pt.corrupt-")
                                       for p in latest.parent.iterdir())


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _train(out, steps=2)
    good = {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()}
    import mvfm_nerfstudio.training.trainer as trainer_module

    real = trainer_module.location_loss
    monkeypatch.setattr(trainer_module, "location_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(_errors("TrainingDivergedError"), match=r"step 3: non-finite.*step-0000002\.safetensors"):
        _train(out, steps=4, resume=True)
    assert {p.name: p.read_bytes() for p in (out / "checkpoints").iterdir()} == good


def test_two_views_point_to_holdout_every_0(tmp_path):
    from mvfm_nerfstudio.data import load_scene

    two = load_scene(tiny_scene_path(0)).subset([0, 1])
    with pytest.raises(ValueError, match="--holdout-every 0"):
        Trainer(tiny_config(tiny_scene_path(0), tmp_path / "o", holdout_every=8), scenes=[two]).setup()


# ---------------------------------------------------------------------------------------------- 8: smaller ones


def _console_scripts():
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return sorted(scripts.items())


@pytest.mark.parametrize("name, target", _console_scripts())
def test_every_console_script_uses_the_shared_cli_wrapper(name, target):
    import importlib

    module, func = target.split(":")
    entry = getattr(importlib.import_module(module), func)
    assert getattr(entry, "mvfm_cli", None) == name, f"{name}: decorate {target} with @cli_entrypoint({name!r})"


def test_a_user_error_is_one_line_and_exit_2_with_traceback_only_under_debug(tmp_path, capsys):
    from mvfm_nerfstudio.errors import SceneError
    from mvfm_nerfstudio.scripts.train import entrypoint

    args = ["--preset", "tiny-test", "--scenes", str(tmp_path / "no-such-scene"), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        entrypoint(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("mvfm-train: error: scene path") and "no-such-scene" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2 and "--debug" in err
    with pytest.raises(SceneError, match="no-such-scene"):
        entrypoint(args + ["--debug"])


def test_make_scene_overwrite_replaces_only_a_generated_scene(tmp_path):
    import dataclasses

    from mvfm_nerfstudio.data.generator import make_scene, tiny_config as scene_config
    from mvfm_nerfstudio.errors import SceneError

    config = dataclasses.replace(scene_config(seed=0), num_views=2, write_colmap=False, overwrite=True)
    unrelated = tmp_path / "mine"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    with pytest.raises(SceneError, match="not a scene written by mvfm-make-scene"):
        make_scene(config, unrelated, progress=False)
    assert (unrelated / "thesis.tex").read_text() == "precious"
    scene = make_scene(config, tmp_path / "scene", progress=False)
    (scene / "images" / "stale.png").write_bytes(b"x")
    make_scene(config, scene, progress=False)  # a generated scene may be replaced
    assert not (scene / "images" / "stale.png").exists() and (scene / "transforms.json").is_file()


def test_segment_removes_only_its_own_stale_masks(tmp_path):
    from mvfm_nerfstudio.segmentation import SegmentConfig, segment_scene

    out = tmp_path / "seg"
    for sub in ("masks", "similarity"):
        (out / sub).mkdir(parents=True)
        (out / sub / "old_view.png").write_bytes(b"stale")
    (out / "masks" / "notes.png").write_bytes(b"not ours")
    (out / "segment.json").write_text(json.dumps({"views": [{"mask": "masks/old_view.png"}]}))  # an earlier run
    config = SegmentConfig(scene=tiny_scene_path(0), output_dir=out, query_view=0, query_pixel=(64, 2),
                           features=_config(tmp_path, feature_resolution=8))
    summary = segment_scene(config, progress=False)
    masks = sorted(p.name for p in (out / "masks").iterdir())
    assert "old_view.png" not in masks and not (out / "similarity" / "old_view.png").exists()
    assert "notes.png" in masks  # not listed by an earlier run: left alone
    assert len(masks) == summary["num_views"] + 1


def test_a_text_segment_into_an_earlier_runs_folder_leaves_none_of_its_outputs(tmp_path):
    """--text writes no query file: the earlier run's query file and masks must not stay beside its masks."""
    from mvfm_nerfstudio.segmentation import SegmentConfig, segment_scene

    out = tmp_path / "seg"
    for sub in ("masks", "similarity"):
        (out / sub).mkdir(parents=True)
        (out / sub / "old_view.png").write_bytes(b"stale")
    (out / "query_feature.safetensors").write_bytes(b"an earlier pixel query")
    (out / "segment.json").write_text(json.dumps({"views": [{"mask": "masks/old_view.png"}]}))  # an earlier run
    features = _config(tmp_path, feature_resolution=8, backbone="clip_vitb16")
    summary = segment_scene(SegmentConfig(scene=tiny_scene_path(0), output_dir=out, text="red mug",
                                          text_weights="random", features=features), progress=False)
    assert not (out / "query_feature.safetensors").exists()
    assert sorted(p.name for p in (out / "masks").iterdir()) == sorted(Path(v["mask"]).name for v in summary["views"])
    assert not (out / "similarity" / "old_view.png").exists()


def test_degenerate_features_give_a_clear_segmentation_error():
    from mvfm_nerfstudio.segmentation import segment_views

    constant = [torch.ones(3, 4, 5) for _ in range(2)]
    sizes = torch.tensor([[6, 8], [6, 8]])
    with pytest.raises(ValueError, match="degenerate"):
        segment_views(constant, sizes, torch.ones(5))
    with pytest.raises(ValueError, match="query feature is zero"):
        segment_views(constant, sizes, torch.zeros(5))


def test_printed_viewer_command_is_shell_quoted(tmp_path):
    import shlex

    from mvfm_nerfstudio.nerfstudio_plugin.demo import viewer_command

    config = tmp_path / "my runs" / "it's" / "config.yml"
    assert shlex.split(viewer_command(config)) == ["ns-viewer", "--load-config", str(config),
                                                  "--viewer.websocket-host", "127.0.0.1"]


def test_a_missing_weights_file_in_the_feature_store_lists_the_weight_options(tmp_path):
    from mvfm_nerfstudio.errors import WeightsUnavailableError

    store = FeatureStore(_config(tmp_path, weights=str(tmp_path / "missing.safetensors")), _views(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=r"(?s)missing\.safetensors.*does not exist.*weights='random'"):
        store.prepare()


# ---------------------------------------------------------------------------------------------- 5: ns-train inputs


def _bad_scene(tmp_path: Path, damage: str) -> Path:
    from data_helpers import copy_scene, edit_transforms

    scene = copy_scene(tiny_scene_path(0), tmp_path / "scene")
    if damage == "truncated-png":
        img = scene / "images" / "frame_00002.png"
        img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    elif damage == "nan-pose":
        edit_transforms(scene, lambda m: m["frames"][3]["transform_matrix"][0].__setitem__(3, float("nan")))
    elif damage == "mixed-sizes":
        img = scene / "images" / "frame_00005.png"
        Image.open(img).resize((64, 48)).save(img)

        def per_frame_sizes(meta):
            for i, frame in enumerate(meta["frames"]):
                frame["w"], frame["h"] = (64, 48) if i == 5 else (meta["w"], meta["h"])
            del meta["w"], meta["h"]

        edit_transforms(scene, per_frame_sizes)
    return scene


@pytest.mark.parametrize("damage, named", [
    ("truncated-png", r"frame_00002\.png is not a readable image.*truncated"),
    ("nan-pose", r"pose of frame 3 \(images/frame_00003\.png\).*NaN"),
    ("mixed-sizes", r"frame 5 .*frame_00005\.png.* is 64x48"),
])
def test_ns_train_datamanagers_name_the_bad_input_before_loading(tmp_path, damage, named):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from mvfm_nerfstudio.errors import SceneError
    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import MVFMDataManager, MVFMDataManagerConfig

    scene = _bad_scene(tmp_path, damage)
    config = MVFMDataManagerConfig(dataparser=NerfstudioDataParserConfig(data=scene),
                                   features=_config(tmp_path, feature_resolution=8))
    with pytest.raises(SceneError, match=named):
        MVFMDataManager(config)
    assert not (tmp_path / "cache").exists()  # refused before any "cache miss -> computing"


@pytest.mark.parametrize("method", ["features", "splat"])
def test_the_scene_validated_is_the_one_given_with_data(tmp_path, method):
    """``ns-train ... --data X`` sets only the datamanager's ``data`` (Nerfstudio copies it into the dataparser during
    set-up): the check must read X, not the dataparser's default ``.``."""
    from mvfm_nerfstudio.errors import SceneError
    from mvfm_nerfstudio.nerfstudio_plugin import datamanager as dm

    scene = _bad_scene(tmp_path, "truncated-png")
    config_class, manager = ((dm.MVFMDataManagerConfig, dm.MVFMDataManager) if method == "features"
                             else (dm.MVFMFullImageDatamanagerConfig, dm.MVFMFullImageDatamanager))
    config = config_class(data=scene, features=_config(tmp_path, feature_resolution=8))
    assert dm.scene_path(config) == scene
    with pytest.raises(SceneError, match=r"frame_00002\.png is not a readable image.*truncated"):
        manager(config)
    assert not (tmp_path / "cache").exists()


def test_the_splat_datamanager_validates_the_scene_too(tmp_path):
    from mvfm_nerfstudio.errors import SceneError
    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import MVFMFullImageDatamanager, MVFMFullImageDatamanagerConfig
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import NerfstudioPlyDataParserConfig

    scene = _bad_scene(tmp_path, "truncated-png")
    config = MVFMFullImageDatamanagerConfig(dataparser=NerfstudioPlyDataParserConfig(data=scene),
                                            features=_config(tmp_path, feature_resolution=8))
    with pytest.raises(SceneError, match=r"frame_00002\.png is not a readable image.*truncated"):
        MVFMFullImageDatamanager(config)
    assert not (tmp_path / "cache").exists()
