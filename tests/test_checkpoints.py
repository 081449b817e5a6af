"""Adapter checkpoints and backbone weight loading (pretrained cache, local file, random)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import randomize_adapters
from mvfm_nerfstudio import CheckpointMismatchError, WeightsUnavailableError, create_backbone, create_mvfm
from mvfm_nerfstudio.backbones import vit as vit_module
from mvfm_nerfstudio.models.checkpoint import read_adapter_metadata
from test_mvfm import inputs


def test_adapter_round_trip_reproduces_outputs_exactly(tmp_path):
    torch.manual_seed(0)
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, share_adapters=True)
    randomize_adapters(model, seed=3)
    path = tmp_path / "adapters.safetensors"
    model.save_adapters(path, metadata={"note": "test"})
    meta = read_adapter_metadata(path)
    assert meta["backbone"] == "dinov2_vits14_reg" and meta["tiny"] == "1" and meta["note"] == "test"
    assert json.loads(meta["config"])["share_adapters"] is True

    other = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, share_adapters=True)
    other.backbone.load_state_dict(model.backbone.state_dict())
    images, k, c2w = inputs(model, s=3)
    with torch.no_grad():
        assert not torch.equal(other(images, k, c2w), model(images, k, c2w))
        other.load_adapters(path)
        assert torch.equal(other(images, k, c2w), model(images, k, c2w))
    # only the adapters are stored, not the frozen backbone
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert all(not key.startswith("backbone.") for key in f.keys())


def test_create_mvfm_with_adapters_uses_stored_config(tmp_path):
    torch.manual_seed(0)
    model = create_mvfm("dinov3_vits16", weights="random", tiny=True, adapter_blocks=(1,), adapter_dim=32)
    randomize_adapters(model)
    path = tmp_path / "a.safetensors"
    model.save_adapters(path)
    # runtime attention options may differ, architecture comes from the file
    loaded = create_mvfm("dinov3_vits16", weights="random", tiny=True, adapters=str(path), attention="knn")
    assert loaded.config.adapter_dim == 32 and loaded.config.attention == "knn"
    with pytest.raises(ValueError, match="adapter_dim"):
        create_mvfm("dinov3_vits16", weights="random", tiny=True, adapters=str(path), adapter_dim=64)


def test_loading_adapters_into_mismatched_model_fails_clearly(tmp_path):
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True)
    path = tmp_path / "a.safetensors"
    model.save_adapters(path)
    with pytest.raises(CheckpointMismatchError, match="backbone: checkpoint 'dinov2_vits14_reg', model 'dinov2_vits14'"):
        create_mvfm("dinov2_vits14", weights="random", tiny=True).load_adapters(path)
    with pytest.raises(CheckpointMismatchError, match="use_rays"):
        create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, use_rays=False).load_adapters(path)
    with pytest.raises(CheckpointMismatchError, match="tiny"):
        create_mvfm("dinov2_vits14_reg", weights="random", tiny=False).load_adapters(path)
    # a safetensors file that is not an adapter checkpoint
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="not an MVFM adapter checkpoint"):
        model.load_adapters(tmp_path / "other.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointMismatchError, match="not a readable"):
        model.load_adapters(tmp_path / "corrupt.safetensors")
    with pytest.raises(ValueError, match=".safetensors"):
        model.save_adapters(tmp_path / "a.pth")


def test_adapters_on_other_backbone_weights_warn(tmp_path):
    torch.manual_seed(0)
    model = create_mvfm("dinov2_vits14", weights="random", tiny=True)
    model.save_adapters(tmp_path / "a.safetensors")
    torch.manual_seed(1)
    other = create_mvfm("dinov2_vits14", weights="random", tiny=True)
    with pytest.warns(UserWarning, match="other backbone weights"):
        other.load_adapters(tmp_path / "a.safetensors")


def _save_backbone(name, path, tiny=False):
    torch.manual_seed(42)
    bb = create_backbone(name, "random", tiny=tiny)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(path))
    return bb


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "clip_vitb16"])
def test_local_weights_file_loads_the_real_path(tmp_path, name):
    src = _save_backbone(name, tmp_path / "w.safetensors")
    loaded = create_backbone(name, tmp_path / "w.safetensors")
    assert loaded.weights == str((tmp_path / "w.safetensors").resolve())
    x = torch.rand(1, 3, 4 * src.patch_size, 3 * src.patch_size)
    with torch.no_grad():
        assert torch.equal(src(x), loaded(x))


def test_weights_of_another_backbone_are_rejected(tmp_path):
    _save_backbone("dinov2_vits14", tmp_path / "s.safetensors")
    with pytest.raises(CheckpointMismatchError, match="does not fit backbone 'dinov2_vitb14'"):
        create_backbone("dinov2_vitb14", tmp_path / "s.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointMismatchError, match="could not read"):
        create_backbone("dinov2_vits14", tmp_path / "bad.safetensors")


def test_missing_file_and_offline_pretrained_name_all_options(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("dinov2_vits14", tmp_path / "nope.safetensors")
    assert "does not exist" in str(info.value)
    monkeypatch.setattr(vit_module, "cached_pretrained_file", lambda spec: None)
    monkeypatch.setattr(vit_module, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsUnavailableError) as info:
        create_backbone("dinov2_vits14", "pretrained")
    msg = str(info.value)
    for option in ("weights='pretrained'", "weights='/path/to/weights.safetensors'", "weights='random'"):
        assert option in msg
    with pytest.raises(ValueError, match="tiny"):
        create_backbone("dinov2_vits14", "pretrained", tiny=True)


def test_pretrained_weights_load_from_hugging_face_cache(tmp_path, monkeypatch):
    """The real 'pretrained' path, fed by a Hugging Face cache we populate ourselves."""
    import timm
    from huggingface_hub import constants

    name = "dinov2_vits14"
    spec = vit_module.get_backbone_spec(name)
    repo = timm.models.get_pretrained_cfg(spec.timm_pretrained_name).hf_hub_id
    snapshot = tmp_path / f"models--{repo.replace('/', '--')}" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (tmp_path / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("abc123")
    src = _save_backbone(name, snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(vit_module, "_hub_reachable", lambda timeout=3.0: pytest.fail("must not touch the network"))
    loaded = create_backbone(name, "pretrained")
    assert loaded.weights == "pretrained"
    x = torch.rand(1, 3, 28, 42)
    with torch.no_grad():
        assert torch.equal(src(x), loaded(x))


def test_timm_version_check_message():
    from mvfm_nerfstudio._compat import check_timm_version

    check_timm_version("1.0.31")
    with pytest.raises(ImportError, match='pip install --no-deps "timm>=1.0.15'):
        check_timm_version("0.6.7")


def test_import_fails_helpfully_with_old_timm(tmp_path):
    import subprocess
    import sys

    fake = tmp_path / "timm"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '0.6.7'\n")
    proc = subprocess.run(
        [sys.executable, "-c", "import mvfm_nerfstudio"],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )
    assert proc.returncode != 0
    assert "found timm 0.6.7" in proc.stderr and "--no-deps" in proc.stderr
