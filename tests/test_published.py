"""The MVFM authors' released models: their checkpoint layout, their forward, every way in, and the comparison.

The real ``Leoseg/*`` files cannot be fetched here, so checkpoints are written in the authors' exact layout
with random values at the tiny test size (``authors_reference.write_checkpoint``), and each converted model is
compared with an independent reference forward written from their code's math (``authors_reference``).
The golden fixture (``../shared/data/golden``, made by running their own code) checks the full-size MV-DINOv2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import authors_reference as ref
from authors_reference import reference_forward, write_checkpoint
from conftest import orbit_cameras

from mvfm_nerfstudio import CheckpointMismatchError, MVFMConfig, WeightsUnavailableError, create_mvfm
from mvfm_nerfstudio.backbones import vit as vit_module
from mvfm_nerfstudio.models import published as published_module

VARIANTS = ("dinov2_reg", "dinov2_reg_no_plucker", "dinov3", "clip", "sam")
# non-square inputs (rows and columns of resampled position grids, SAM's padded windows)
SIZES = {"dinov2_reg": (84, 112), "dinov2_reg_no_plucker": (84, 112), "dinov3": (112, 144), "clip": (96, 128),
         "sam": (128, 160)}
TOL = 1e-5


def _inputs(variant: str, s: int, seed: int = 0):
    h, w = SIZES[variant]
    k, c2w = orbit_cameras(1, s, h, w, seed=seed + s)
    images = torch.rand(1, s, 3, h, w, generator=torch.Generator().manual_seed(seed + s))
    return images, k, c2w


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every variant in the authors' layout: ``<root>/<variant>/{args.yaml, checkpoints/best.pth}``."""
    root = tmp_path_factory.mktemp("authors")
    return {v: (root / v, write_checkpoint(v, root / v, seed=VARIANTS.index(v))) for v in VARIANTS}


@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_model_computes_what_the_authors_code_computes(variant, checkpoints, tmp_path, monkeypatch):
    """Folder, .pth and mvfm-convert file load the same model, equal to the reference forward for S = 1, 2, 4."""
    folder, sd = checkpoints[variant]
    model = create_mvfm("dinov2_vits14_reg", adapters=str(folder))
    assert model.published["published_variant"] == variant and model.backbone.tiny
    assert model.config == MVFMConfig.authors(variant, input_size=model.config.input_size, ray_embed_dim=ref.RAY)
    converted = tmp_path / "model.safetensors"
    from mvfm_nerfstudio.scripts.convert import entrypoint

    entrypoint(["--source", str(folder / "checkpoints" / "best.pth"), "--output", str(converted)])
    with monkeypatch.context() as m:  # the converted file is read without any unpickling
        m.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a converted model"))
        again = create_mvfm("dinov2_vits14_reg", adapters=str(converted))
    assert again.config == model.config
    for s in (1, 2, 4):
        images, k, c2w = _inputs(variant, s)
        with torch.no_grad():
            out = model(images, k, c2w)[0]
            base = model.forward_base(images)[0]
            out_again = again(images, k, c2w)[0]
        expected = reference_forward(variant, sd, images[0], k[0], c2w[0])
        assert out.shape == expected.shape
        assert (out - expected).abs().max() < TOL, f"S={s}: {(out - expected).abs().max():.3g}"
        # the base model is the backbone before LoRA and without adapters
        expected_base = reference_forward(variant, sd, images[0], k[0], c2w[0], adapters=False, lora=False)
        assert (base - expected_base).abs().max() < TOL
        assert torch.equal(out, out_again)  # the converted file holds exactly the same model
        # the comparison is not vacuous: the adapters change the features
        assert (out - base).abs().max() > 1e-2


def test_sam_mask_decoder_is_kept_and_loadable(checkpoints, tmp_path):
    from mvfm_nerfstudio.models.published import convert_published, sam_decoder_state_dict

    folder, sd = checkpoints["sam"]
    decoder = sam_decoder_state_dict(folder)
    assert set(decoder) == {k for k in sd if k.startswith(("prompt_encoder.", "mask_decoder."))}
    assert all(torch.equal(decoder[k], sd[k]) for k in decoder)  # SAM's names and stored dtype (bf16)
    convert_published(folder, tmp_path / "sam.safetensors")
    again = sam_decoder_state_dict(tmp_path / "sam.safetensors")
    assert set(again) == set(decoder) and all(torch.equal(again[k], decoder[k]) for k in decoder)
    with pytest.raises(CheckpointMismatchError, match="no SAM mask decoder"):
        sam_decoder_state_dict(checkpoints["dinov2_reg"][0])


def test_golden_fixture_from_the_authors_code_is_reproduced(shared_data):
    """Full-size MV-DINOv2 run by their own code (random weights): expected features and base features."""
    from safetensors.torch import load_file

    golden = shared_data / "golden" / "mvfm_dinov2_reg"
    if not golden.is_dir():
        pytest.skip("golden fixture not present")
    fx = load_file(str(golden / "fixture.safetensors"))
    model = create_mvfm("dinov2_vits14_reg", adapters=str(golden))
    assert not model.backbone.tiny and len(model.backbone_lora) == 12
    with torch.no_grad():
        out = model(fx["images"], fx["intrinsics"], fx["cam_to_world"])
        base = model.forward_base(fx["images"])
    assert (out - fx["expected_features"]).abs().max() < TOL  # measured 2.5e-6 (features up to 4.2)
    assert (base - fx["base_features"]).abs().max() < TOL
    # the Plücker maps their data loader built, from our camera normalisation + ray map
    from mvfm_nerfstudio.geometry.cameras import normalize_cameras, plucker_ray_map

    normalized, _ = normalize_cameras(fx["cam_to_world"].double(), "authors")
    k = fx["intrinsics"].double()
    rays = plucker_ray_map(k[:, :1].expand_as(k), normalized, 224, 224)
    assert (rays - fx["plucker"][0]).abs().max() < TOL


def test_golden_checkpoint_with_unshared_adapters_is_refused(shared_data, tmp_path):
    golden = shared_data / "golden" / "mvfm_dinov2_reg" / "checkpoints" / "best.pth"
    if not golden.is_file():
        pytest.skip("golden fixture not present")
    ckpt = torch.load(golden, map_location="cpu", weights_only=True)
    ckpt["model"]["spatial_adapters.5.norm.weight"] = ckpt["model"]["spatial_adapters.5.norm.weight"] + 1
    torch.save(ckpt, tmp_path / "best.pth")
    with pytest.raises(CheckpointMismatchError, match=r"spatial_adapters\.5\.norm\.weight differs from spatial_adapters\.1"):
        create_mvfm("dinov2_vits14_reg", adapters=str(tmp_path / "best.pth"))


# ---------------------------------------------------------------------------------------------- refusals


def _refused(folder: Path, match: str, backbone: str = "dinov2_vits14_reg", **kw):
    with pytest.raises(CheckpointMismatchError, match=match) as info:
        create_mvfm(backbone, adapters=str(folder), **kw)
    return str(info.value)


def test_mismatched_checkpoints_are_refused_naming_keys_and_shapes(checkpoints, tmp_path, monkeypatch):
    # wrong variant: the folder's name promises MV-DINOv2, the weights are the Plücker-free one
    write_checkpoint("dinov2_reg_no_plucker", tmp_path / "dinov2_reg")
    msg = _refused(tmp_path / "dinov2_reg", "expected the authors' 'dinov2_reg' checkpoint")
    assert "spatial_adapters.0.norm.weight [64]" in msg
    # ... and args.yaml that contradicts the weights
    write_checkpoint("dinov2_reg", tmp_path / "flagged", args={"disable_plucker": True})
    _refused(tmp_path / "flagged", "disable_plucker=True")
    # wrong backbone asked for
    _refused(checkpoints["sam"][0], "checkpoint's backbone is 'sam_vitb'", backbone="dinov2_vitb14")
    # missing keys: a backbone tensor and an adapter tensor
    sd = ref.authors_state_dict("dinov2_reg")
    del sd["vit.base_model.model.blocks.1.mlp.fc2.weight"]
    write_checkpoint("dinov2_reg", tmp_path / "missing", sd=sd)
    msg = _refused(tmp_path / "missing", "missing")
    assert "vit.base_model.model.blocks.1.mlp.fc2.weight [64, 256]" in msg
    sd = ref.authors_state_dict("dinov2_reg")
    del sd["spatial_adapters.1.ffn.fc1.bias"]
    write_checkpoint("dinov2_reg", tmp_path / "missing_adapter", sd=sd)
    assert "missing: spatial_adapters.1.ffn.fc1.bias" in _refused(tmp_path / "missing_adapter", "adapters do not fit")
    # another backbone size (width 96: neither ViT-S nor the tiny test size)
    monkeypatch.setattr(ref, "WIDTH", 96)
    write_checkpoint("dinov2_reg", tmp_path / "wide")
    msg = _refused(tmp_path / "wide", "another backbone size")
    assert "vit.base_model.model.cls_token: checkpoint [1, 1, 96], expected [1, 1, 384]" in msg
    monkeypatch.undo()
    # LoRA factors that do not fit their layer
    sd = ref.authors_state_dict("clip")
    sd["base_model.model.blocks.0.attn.qkv.lora_B.default.weight"] = torch.zeros(100, ref.RANK)
    write_checkpoint("clip", tmp_path / "lora", sd=sd)
    msg = _refused(tmp_path / "lora", "LoRA factors")
    assert "[100, 4]" in msg and "[192, 64]" in msg
    # settings no published model uses
    write_checkpoint("dinov2_reg", tmp_path / "stride7", args={"stride": 7})
    _refused(tmp_path / "stride7", "stride=7")
    # contradicting requests
    _refused(checkpoints["clip"][0], "carries its own fine-tuned backbone", weights="random")
    with pytest.raises(ValueError, match="fixed architecture"):
        create_mvfm("dinov2_vits14_reg", adapters=str(checkpoints["clip"][0]), num_heads=4)


class _NotATensor:
    pass


def test_checkpoints_that_need_code_to_unpickle_are_refused(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    sd = ref.authors_state_dict("dinov2_reg")
    torch.save({"model": sd, "args": _NotATensor()}, tmp_path / "checkpoints" / "best.pth")
    with pytest.raises(CheckpointMismatchError, match="needs code to unpickle") as info:
        create_mvfm("dinov2_vits14_reg", adapters=str(tmp_path))
    assert "weights_only=True" in str(info.value)
    (tmp_path / "checkpoints" / "best.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="could not read"):
        create_mvfm("dinov2_vits14_reg", adapters=str(tmp_path))


# ---------------------------------------------------------------------------------------------- hub and cache


def _hf_cache(root: Path, repo: str, files: dict) -> Path:
    """A Hugging Face hub cache holding ``files`` (path in repo -> source path) of ``repo`` at one snapshot."""
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / "0123abcd"
    for rel, src in files.items():
        (snapshot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, snapshot / rel)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("0123abcd")
    return root


def _offline(monkeypatch, cache: Path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(vit_module, "_hub_reachable", lambda timeout=3.0: False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("must not download"))


def test_hub_id_offline_and_not_cached_fails_fast_naming_the_options(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "empty_cache")
    with pytest.raises(WeightsUnavailableError) as info:
        create_mvfm("dinov2_vits14_reg", adapters="Leoseg/dinov2_reg")
    msg = str(info.value)
    assert "Leoseg/dinov2_reg" in msg and "not in the Hugging Face cache" in msg
    for option in ("copy the cache from a connected machine", "models--Leoseg--dinov2_reg", "args.yaml",
                   "mvfm-convert", "huggingface.co"):
        assert option in msg, option


def test_hub_id_loads_from_the_hugging_face_cache_without_network(checkpoints, tmp_path, monkeypatch):
    folder, _ = checkpoints["dinov2_reg"]
    # the layout snapshot_download gives the authors' scripts: <exp_name>/args.yaml, <exp_name>/checkpoints/best.pth
    cache = _hf_cache(tmp_path / "hub", "Leoseg/dinov2_reg", {
        "dinov2_reg/args.yaml": folder / "args.yaml", "dinov2_reg/checkpoints/best.pth": folder / "checkpoints/best.pth"})
    _offline(monkeypatch, cache)
    model = create_mvfm("dinov2_vits14_reg", adapters="Leoseg/dinov2_reg")
    local = create_mvfm("dinov2_vits14_reg", adapters=str(folder))
    images, k, c2w = _inputs("dinov2_reg", 2)
    with torch.no_grad():
        assert torch.equal(model(images, k, c2w), local(images, k, c2w))
    assert model.published["published_source"] == "Leoseg/dinov2_reg"
    assert published_module.cached_published("dinov2_reg") is not None
    assert published_module.cached_published("clip") is None


def test_mvfm_info_lists_the_published_models_and_their_cache_state(checkpoints, tmp_path, monkeypatch, capsys):
    folder, _ = checkpoints["dinov2_reg"]
    _offline(monkeypatch, _hf_cache(tmp_path / "hub", "Leoseg/dinov2_reg", {
        "args.yaml": folder / "args.yaml", "checkpoints/best.pth": folder / "checkpoints/best.pth"}))
    monkeypatch.setenv("COLUMNS", "200")
    from mvfm_nerfstudio.scripts.info import InfoArgs, main

    main(InfoArgs())
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    for m in published_module.PUBLISHED_MODELS.values():
        assert m.repo_id in rows
    assert rows["Leoseg/dinov2_reg"].rstrip(" │").endswith("yes")
    assert rows["Leoseg/sam"].rstrip(" │").endswith("no")
    assert "dinov2_reg_small_finetuned.pth" in out


def test_fit3d_weights_load_as_backbone_weights(tmp_path, monkeypatch):
    """FiT3D's files are plain timm state dicts of the same architecture (here: random values)."""
    from mvfm_nerfstudio import create_backbone

    torch.manual_seed(0)
    src = create_backbone("dinov2_vits14_reg", "random")
    torch.save(src.model.state_dict(), tmp_path / "dinov2_reg_small_finetuned.pth")
    _offline(monkeypatch, tmp_path / "empty")
    with pytest.raises(WeightsUnavailableError, match="yuanwenyue/FiT3D") as info:
        create_backbone("dinov2_vits14_reg", "fit3d")
    assert "copy the Hugging Face cache" in str(info.value)
    with pytest.raises(WeightsUnavailableError, match="FiT3D has no fine-tuned backbone"):
        create_backbone("sam_vitb", "fit3d")
    _offline(monkeypatch, _hf_cache(tmp_path / "hub", "yuanwenyue/FiT3D",
                                    {"dinov2_reg_small_finetuned.pth": tmp_path / "dinov2_reg_small_finetuned.pth"}))
    loaded = create_backbone("dinov2_vits14_reg", "fit3d")
    assert loaded.weights == "fit3d"
    x = torch.rand(1, 3, 42, 56)
    with torch.no_grad():
        assert torch.equal(src(x), loaded(x))


# ---------------------------------------------------------------------------------------------- profile


def test_authors_profile_and_camera_frame():
    cfg = MVFMConfig.authors("dinov3")
    assert (cfg.adapter_type, cfg.mlp_ratio, cfg.adapter_pool, cfg.adapt_registers, cfg.final_norm) == \
        ("authors", 0.0, 2, False, True)
    assert MVFMConfig.from_dict(json.loads(cfg.to_json())) == cfg
    dino = MVFMConfig.authors("dinov2_reg")
    assert dino.input_size == (518, 518) and dino.pos_embed_resample == "dinov2_hub" and not dino.final_norm
    with pytest.raises(ValueError, match="adapter_dim"):
        MVFMConfig(adapter_type="authors", adapter_dim=32)
    # an untrained authors' model (zero output projections) is its base model, registers adapted or not
    torch.manual_seed(0)
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, **dict(dino.to_dict(), input_size=None))
    images, k, c2w = _inputs("dinov2_reg", 3)
    with torch.no_grad():
        assert torch.allclose(model(images, k, c2w), model.forward_base(images), atol=1e-6)
    # their camera frame: view 0 at the origin with identity rotation, at distance 2 from the inlier mean
    from mvfm_nerfstudio.geometry.cameras import normalize_cameras

    _, c2w = orbit_cameras(1, 5, 32, 32, seed=3)
    normalized, scale = normalize_cameras(c2w.double(), "authors")
    assert torch.allclose(normalized[0, 0], torch.eye(4, dtype=torch.float64), atol=1e-6)  # float32 poses
    centres = normalized[0, :, :3, 3]
    assert float((centres[0] - centres.mean(0)).norm()) == pytest.approx(2.0, abs=1e-6)
    rays = ref.plucker(k[0, :1].expand(5, 3, 3), c2w[0], 32, 32)
    from mvfm_nerfstudio.geometry.cameras import plucker_ray_map

    assert (plucker_ray_map(k[0, :1].expand(5, 3, 3), normalized[0], 32, 32) - rays).abs().max() < TOL


def test_published_model_runs_with_knn_and_pooled_attention(checkpoints):
    """Run-time attention options work with adapted registers: knn over all views = global attention."""
    folder, _ = checkpoints["dinov2_reg"]
    images, k, c2w = _inputs("dinov2_reg", 4)
    glob = create_mvfm("dinov2_vits14_reg", adapters=str(folder))
    knn = create_mvfm("dinov2_vits14_reg", adapters=str(folder), attention="knn", num_neighbors=3, kv_pool=1)
    pooled = create_mvfm("dinov2_vits14_reg", adapters=str(folder), attention="knn", num_neighbors=2, kv_pool=2)
    with torch.no_grad():
        a, b, c = glob(images, k, c2w), knn(images, k, c2w), pooled(images, k, c2w)
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.isfinite(c).all() and (c - a).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- tools


@pytest.fixture(scope="module")
def small_published(tmp_path_factory):
    """MV-DINOv2 in the authors' layout whose args.yaml asks for 56 x 56 inputs (a 4 x 4 grid: fast tools)."""
    root = tmp_path_factory.mktemp("small") / "dinov2_reg"
    write_checkpoint("dinov2_reg", root, args={"image_size": [56, 56]})
    return root


@pytest.fixture(scope="module")
def scene():
    from data_helpers import tiny_scene_path

    return tiny_scene_path(0)


def test_feature_store_keys_published_sources_by_content_and_uses_their_input_size(small_published, scene,
                                                                                    tmp_path):
    from mvfm_nerfstudio.data import load_scene
    from mvfm_nerfstudio.feature_store import FeatureStore, FeatureStoreConfig, ViewSource

    posed = load_scene(scene)
    views = ViewSource(list(posed.image_paths), posed.image_sizes, posed.intrinsics, posed.cam_to_world,
                       lambda i: posed.load_image(i).permute(1, 2, 0), scene_name=posed.name)
    cfg = FeatureStoreConfig(adapters=str(small_published), cache_dir=tmp_path / "cache", feature_dim=None)
    store = FeatureStore(cfg, views, device="cpu")
    assert store.grid == (4, 4)  # the profile's 56 x 56 square input, not feature_resolution
    store.prepare()
    assert not store.cache_hit and store.feature_dim == ref.WIDTH
    # the same files under another name: the same entry; other weights: another entry
    moved = tmp_path / "elsewhere" / "dinov2_reg"
    shutil.copytree(small_published, moved)
    again = FeatureStore(FeatureStoreConfig(adapters=str(moved), cache_dir=tmp_path / "cache", feature_dim=None),
                         views, device="cpu").prepare()
    assert again.cache_hit and again.path == store.path
    write_checkpoint("dinov2_reg", moved, seed=7, args={"image_size": [56, 56]})
    other = FeatureStore(FeatureStoreConfig(adapters=str(moved), cache_dir=tmp_path / "cache", feature_dim=None),
                         views, device="cpu")
    assert other.cache_key() != store.cache_key()


def test_mvfm_eval_compare_writes_the_paper_table(small_published, tmp_path):
    from _mvfm_training_helpers import generated_scene

    from mvfm_nerfstudio import create_backbone

    scene = generated_scene(tmp_path)
    torch.manual_seed(1)
    fit3d = tmp_path / "fit3d_tiny.pth"
    torch.save(create_backbone("dinov2_vits14_reg", "random", tiny=True).model.state_dict(), fit3d)
    from mvfm_nerfstudio.scripts.eval import entrypoint

    entrypoint(["--scenes", str(scene), "--adapters", str(small_published), "--output-dir", str(tmp_path / "out"),
                "--num-sets", "4", "--num-views", "3", "--no-progress", "--compare", "--fit3d-weights", str(fit3d)])
    payload = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert payload["resolved"]["input_size"] == [56, 56]
    table = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert list(table["models"]) == ["base", "fit3d", "mvfm"]
    pooled = table["pooled"]
    assert pooled["base"]["base_sim"] == 1.0
    for m in ("fit3d", "mvfm"):
        assert 0 < pooled[m]["loc_err"] < 1 and -1 <= pooled[m]["base_sim"] < 1
    assert pooled["base"]["num_matches"] == pooled["fit3d"]["num_matches"] == pooled["mvfm"]["num_matches"] > 0
    assert len({pooled[m]["loc_err"] for m in pooled}) == 3  # three different models on the same matches
    assert sum(r["count"] for r in table["viewpoint_curve"]) == pooled["mvfm"]["num_matches"]
    md = (tmp_path / "out" / "compare.md").read_text()
    assert "| FiT3D |" in md and "Loc. Err." in md and "Base Sim." in md
    assert (tmp_path / "out" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mvfm_segment_takes_a_published_model(small_published, scene, tmp_path):
    from mvfm_nerfstudio.scripts.segment import entrypoint

    out = tmp_path / "seg"
    entrypoint(["--scene", str(scene), "--features.adapters", str(small_published), "--features.cache-dir",
                str(tmp_path / "cache"), "--query-view", "0", "--query-pixel", "64", "2", "--output-dir", str(out)])
    summary = json.loads((out / "segment.json").read_text())
    assert summary["feature_grid"] == [4, 4] and summary["features"]["multi_view"] is True


@pytest.mark.slow
def test_both_nerfstudio_methods_take_a_published_model(small_published, scene, tmp_path):
    """``--pipeline.datamanager.features.adapters`` of mvfm-features and mvfm-splat (CLI parse + datamanagers)."""
    import tyro
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import (
        MVFMDataManagerConfig,
        MVFMFullImageDatamanagerConfig,
    )
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features_config
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat

    for base in (mvfm_features_config(), mvfm_splat.config):
        parsed = tyro.cli(type(base), default=base, args=["--pipeline.datamanager.features.adapters",
                                                          "Leoseg/dinov2_reg"])
        assert parsed.pipeline.datamanager.features.adapters == "Leoseg/dinov2_reg"
    from mvfm_nerfstudio.feature_store import FeatureStoreConfig

    features = FeatureStoreConfig(adapters=str(small_published), cache_dir=tmp_path / "cache", feature_dim=16)
    dm = MVFMDataManagerConfig(dataparser=NerfstudioDataParserConfig(data=scene), features=features).setup(device="cpu")
    assert dm.feature_store.grid == (4, 4) and not dm.feature_store.cache_hit
    _, batch = dm.next_train(0)
    assert batch["feature"].shape[-1] == 16
    full = MVFMFullImageDatamanagerConfig(dataparser=NerfstudioDataParserConfig(data=scene), features=features).setup(
        device="cpu")
    assert full.feature_store.cache_hit and full.feature_store.path == dm.feature_store.path
