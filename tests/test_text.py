"""Text queries (mvfm_nerfstudio.text): CLIP text tower, text-space (MaskCLIP) dense features, LERF relevancy.

Pretrained CLIP weights are unreachable here: every tower and backbone in these tests has **random weights**
(tiny test sizes), so the embeddings mean nothing. The tests check the mechanics: the relevancy formula, that a
planted text embedding is found, that the dense path is the last block's value path, that one open_clip file
gives both towers in one joint space, and that the tools wire it all up and fail clearly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mvfm_nerfstudio.backbones.vit import create_backbone
from mvfm_nerfstudio.errors import CheckpointMismatchError, NoTextTowerError, WeightsUnavailableError
from mvfm_nerfstudio.features import fit_pca
from mvfm_nerfstudio.text import (
    CANONICAL_NEGATIVES,
    TextQuery,
    create_text_tower,
    lerf_relevancy,
    relevancy_for_query,
    relevancy_mask,
)


@pytest.fixture(scope="module")
def tower():
    return create_text_tower("clip_vitb16", "random", tiny=True, device="cpu")


def test_relevancy_is_lerfs_pairwise_softmax_against_the_worst_negative():
    # hand-computed: cos with the query 0.3, with the negatives 0.1, 0.25, 0.2, 0.0; the closest negative (0.25)
    # decides: exp(3) / (exp(3) + exp(2.5)) = 1 / (1 + exp(-0.5)) = 0.6224593
    pos, neg = torch.tensor([0.3]), torch.tensor([[0.1, 0.25, 0.2, 0.0]])
    assert float(lerf_relevancy(pos, neg)) == pytest.approx(0.6224593, abs=1e-6)
    # LERF's own formulation: softmax of each (query, negative) pair, the pair where the query scores lowest
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(50, generator=g) * 2 - 1, torch.rand(50, 4, generator=g) * 2 - 1
    pairs = torch.softmax(10 * torch.stack([pos[:, None].expand(-1, 4), neg], -1), -1)  # [R, K, 2]
    lerf = pairs.gather(1, pairs[..., 0].argmin(1)[:, None, None].expand(-1, 1, 2))[:, 0, 0]
    assert torch.allclose(lerf_relevancy(pos, neg), lerf, atol=1e-6)
    assert float(lerf_relevancy(torch.tensor([0.2]), torch.tensor([[0.2, -1.0]]))) == pytest.approx(0.5)  # a tie
    with pytest.raises(ValueError, match="negatives must be"):
        lerf_relevancy(pos, neg[:10])


def test_a_planted_text_embedding_is_where_relevancy_peaks_and_the_mask_covers_it(tower):
    """Random tower and features: a view's [h, w, 512] map is the negatives' embeddings plus noise, with the
    query's embedding planted in a 3x4 block; relevancy (full and PCA-reduced features) must find the block."""
    query = TextQuery.encode(tower, "red mug")
    assert query.negatives == CANONICAL_NEGATIVES and query.embeddings.shape == (5, 512)
    assert torch.allclose(query.embeddings.norm(dim=-1), torch.ones(5), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    h, w = 12, 16
    background = query.embeddings[1 + torch.randint(0, 4, (h, w), generator=g)]  # a negative per cell
    features = 3.0 * (background + 0.05 * torch.randn(h, w, 512, generator=g))
    block = torch.zeros(h, w, dtype=torch.bool)
    block[4:7, 9:13] = True
    features[block] = 2.0 * (query.embeddings[0] + 0.05 * torch.randn(int(block.sum()), 512, generator=g))
    rel = relevancy_for_query(features, "red mug", tower)
    assert rel.shape == (h, w)
    assert bool(block.flatten()[rel.flatten().argmax()])
    assert torch.equal(relevancy_mask(rel), block)  # >= 0.5 exactly on the planted block
    assert float(rel[block].min()) > 0.5 > float(rel[~block].max())
    # the feature store's PCA-reduced features give the relevancy of the reconstructed features, exactly
    basis = fit_pca(features.reshape(-1, 512), 16)
    reduced = basis.project(features)
    assert torch.allclose(query.relevancy(reduced, basis), query.relevancy(basis.unproject(reduced)), atol=1e-5)
    assert torch.equal(relevancy_mask(query.relevancy(reduced, basis)), block)
    with pytest.raises(ValueError, match="text-space features"):
        query.relevancy(reduced)  # 16 channels without their basis
    with pytest.raises(ValueError, match="relevancy threshold is in"):
        relevancy_mask(rel, 1.5)


def test_text_space_dense_path_is_the_last_blocks_value_path():
    """MaskCLIP: the last block with its query-key attention replaced by each token attending to itself, then
    CLIP's image projection. Reference: timm's own block run with a diagonal attention mask."""
    torch.manual_seed(0)
    bb = create_backbone("clip_vitb16", "random", tiny=True, text_space=True)
    assert bb.text_space and bb.feature_dim == 512
    images = torch.rand(2, 3, 48, 64)
    tokens, ctx = bb.embed(bb.normalize(images))
    n = tokens.shape[1]
    for i in range(bb.depth - 1):
        tokens = bb.run_block(i, tokens, ctx)
    last = bb.model.blocks[-1]
    only_self = torch.eye(n, dtype=torch.bool)  # True = may attend
    reference = last(tokens, attn_mask=only_self)
    assert torch.allclose(bb.run_block(bb.depth - 1, tokens, ctx), reference, atol=1e-5)
    assert not torch.allclose(last(tokens), reference, atol=1e-3)  # the real attention differs
    dense = F.linear(bb.model.norm(reference)[:, 1:], bb.model.head.weight, bb.model.head.bias)  # [N, h*w, 512]
    expected = dense.transpose(1, 2).reshape(2, 512, 3, 4)
    assert torch.allclose(bb(images), expected, atol=1e-5)
    # inside an MVFM (untrained adapters: exactly the base model), the same features
    from mvfm_nerfstudio.models.build import create_mvfm

    torch.manual_seed(0)
    model = create_mvfm("clip_vitb16", "random", tiny=True, text_space=True)
    eye = torch.eye(4).expand(1, 2, 4, 4).clone()
    eye[..., 2, 3] = 2.0
    k = torch.tensor([[40.0, 0, 32], [0, 40, 24], [0, 0, 1]]).expand(1, 2, 3, 3)
    out = model(images[None], k, eye)
    assert out.shape == (1, 2, 512, 3, 4) and torch.allclose(out, model.forward_base(images[None]), atol=1e-5)


def test_one_open_clip_file_gives_both_towers_in_one_joint_space(tmp_path):
    """A (tiny, random) open_clip CLIP saved as safetensors: as the backbone's weights timm reads its image tower
    with CLIP's projection; as text weights the text tower; both equal open_clip's own encoders."""
    import open_clip
    from safetensors.torch import save_file

    from mvfm_nerfstudio.text.tower import TINY_TEXT_OVERRIDES

    cfg = open_clip.get_model_config("ViT-B-16-quickgelu")
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        cfg["embed_dim"], dict(cfg["vision_cfg"], layers=2, width=64, head_width=32),
        dict(cfg["text_cfg"], **TINY_TEXT_OVERRIDES), quick_gelu=True).eval()
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))

    tower = create_text_tower("clip_vitb16", str(path), tiny=True, device="cpu")
    tok = open_clip.get_tokenizer("ViT-B-16-quickgelu")(["red mug", "object"])
    with torch.no_grad():
        theirs_text = F.normalize(clip.encode_text(tok), dim=-1)
        assert torch.allclose(tower.encode(["red mug", "object"]), theirs_text, atol=1e-5)
        bb = create_backbone("clip_vitb16", str(path), tiny=True, text_space=True)
        images = torch.rand(2, 3, 224, 224)
        ours_image = bb.model(bb.normalize(images))  # timm's CLS path with the kept projection head
        theirs_image = clip.encode_image(bb.normalize(images))
    assert torch.allclose(ours_image, theirs_image, atol=1e-4)
    # an image-only (timm) file has no text tower
    image_only = tmp_path / "image_only.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(image_only))
    with pytest.raises(CheckpointMismatchError, match="has no CLIP text tower"):
        create_text_tower("clip_vitb16", str(image_only), tiny=True)
    with pytest.raises(CheckpointMismatchError, match="do not fit the text tower"):
        create_text_tower("clip_vitb16", str(path))  # tiny file, full-size tower


def test_text_query_on_a_backbone_without_text_tower_names_the_ones_with_one():
    for make in (lambda: create_text_tower("dinov2_vits14_reg", "random", tiny=True),
                 lambda: create_backbone("dinov2_vits14_reg", "random", tiny=True, text_space=True)):
        with pytest.raises(NoTextTowerError, match=r"'dinov2_vits14_reg' has no CLIP text tower.*clip_vitb16"):
            make()
    with pytest.raises(NoTextTowerError, match="fine-tuned on ImageNet"):
        create_text_tower("clip_vitb16_laion", "random")


def test_unavailable_text_weights_fail_fast_naming_the_options(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match=r"(?s)not in the Hugging Face cache.*'pretrained'.*'random'"):
        create_text_tower("clip_vitb16", "pretrained")
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        create_text_tower("clip_vitb16", str(tmp_path / "missing.safetensors"))
    with pytest.raises(WeightsUnavailableError, match="FiT3D has no text tower"):
        create_text_tower("clip_vitb16", "fit3d")
    with pytest.raises(ValueError, match="no pretrained weights"):
        create_text_tower("clip_vitb16", "pretrained", tiny=True)
    with pytest.raises(ValueError, match="non-empty"):
        create_text_tower("clip_vitb16", "random", tiny=True).encode([" "])


def test_text_space_is_part_of_the_feature_cache_key():
    from mvfm_nerfstudio.feature_store import FeatureStoreConfig

    assert "text_space" not in FeatureStoreConfig().key_fields()  # keys of existing entries stay valid
    assert FeatureStoreConfig(backbone="clip_vitb16", text_space=True).key_fields()["text_space"] is True


def _text_cli_args(scene_root, tmp_path, *extra):
    return ["--scene", str(scene_root), "--features.backbone", "clip_vitb16", "--features.weights", "random",
            "--features.tiny", "--features.feature-resolution", "8", "--features.cache-dir", str(tmp_path / "cache"),
            *extra]


def test_mvfm_segment_text_cli_writes_relevancy_masks(tmp_path):
    """mvfm-segment --text on a tiny generated scene (random CLIP: the masks are whatever relevancy >= 0.5 gives;
    checked against the relevancy recomputed from the cached text-space features)."""
    from data_helpers import tiny_scene_path

    from mvfm_nerfstudio.data import load_scene
    from mvfm_nerfstudio.feature_store import FeatureStore
    from mvfm_nerfstudio.geometry.feature_grid import resize_map
    from mvfm_nerfstudio.scripts.segment import entrypoint
    from mvfm_nerfstudio.text import text_tower_for

    scene = load_scene(tiny_scene_path(0))
    out = tmp_path / "mug"
    entrypoint(_text_cli_args(scene.root, tmp_path, "--text", "red mug", "--output-dir", str(out)))
    summary = json.loads((out / "segment.json").read_text())
    assert summary["text"] == "red mug" and summary["text_negatives"] == list(CANONICAL_NEGATIVES)
    assert summary["threshold"] == 0.5 and summary["threshold_mode"] == "lerf" and summary["score"] == "relevancy"
    assert summary["features"]["text_space"] is True and summary["text_weights"] == "random"
    assert not (out / "query_feature.safetensors").exists()

    from mvfm_nerfstudio.segmentation import SegmentConfig
    import tyro

    config = tyro.cli(SegmentConfig, args=_text_cli_args(scene.root, tmp_path, "--text", "red mug"))
    fcfg = config.features
    fcfg.text_space, fcfg.multi_view = True, False
    store = FeatureStore(fcfg, _views(scene)).prepare()
    assert store.cache_hit and str(store.path) == summary["feature_cache"]
    assert store.meta["backbone_feature_dim"] == 512  # CLIP's joint space, PCA-reduced to 64 in the cache
    query = TextQuery.encode(text_tower_for(fcfg), "red mug")
    fractions = []
    for i in range(len(scene)):
        rel = resize_map(query.relevancy(store.feature_map(i), store.reduction_basis),
                         tuple(int(v) for v in scene.image_sizes[i]))
        mask = np.array(Image.open(out / "masks" / f"frame_{i:05d}.png")) > 0
        assert (mask == (rel >= 0.5).numpy()).mean() > 0.999  # PNG round trip of the same numbers
        fractions.append(float(mask.mean()))
    assert fractions == pytest.approx([v["mask_fraction"] for v in summary["views"]], abs=1e-3)

    # a fixed threshold; bad thresholds and a backbone without a text tower fail before anything is computed
    strict = tmp_path / "strict"
    entrypoint(_text_cli_args(scene.root, tmp_path, "--text", "red mug", "--threshold", "0.99",
                              "--output-dir", str(strict)))
    assert json.loads((strict / "segment.json").read_text())["threshold_mode"] == "fixed"
    from mvfm_nerfstudio.segmentation import segment_scene

    bad = tmp_path / "bad"
    for args, error, message in [
        (["--threshold", "1.5"], ValueError, "relevancy in"),
        (["--features.backbone", "dinov2_vits14_reg"], NoTextTowerError, "no CLIP text tower"),
        (["--query-view", "0", "--query-pixel", "1", "1"], ValueError, "exactly one query"),
    ]:
        cfg = tyro.cli(SegmentConfig, args=_text_cli_args(scene.root, tmp_path / "x", "--text", "red mug",
                                                          "--output-dir", str(bad), *args))
        with pytest.raises(error, match=message):
            segment_scene(cfg)
        assert not bad.exists() and not (tmp_path / "x").exists()


def _views(scene):
    from mvfm_nerfstudio.feature_store import ViewSource

    return ViewSource(image_paths=list(scene.image_paths), image_sizes=scene.image_sizes, intrinsics=scene.intrinsics,
                      cam_to_world=scene.cam_to_world, load_image=lambda i: scene.load_image(i).permute(1, 2, 0),
                      extra_key={}, scene_name=scene.name, scene_root=scene.root)


# ------------------------------------------------------------------------------------ viewer text box


@pytest.fixture(scope="module")
def text_pipelines(tmp_path_factory):
    """Both methods on a tiny scene with text-space features of a tiny random CLIP (the panels tests' set-up)."""
    from test_viewer_panels import _features_pipeline, _splat_pipeline, _vary_features

    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    scene = make_scene(tiny_config(seed=0), tmp_path_factory.mktemp("text_viewer") / "scene", progress=False)
    cache = tmp_path_factory.mktemp("text_cache")
    torch.manual_seed(0)
    text = {"backbone": "clip_vitb16", "text_space": True}
    out = {"features": _features_pipeline(scene, cache, **text), "splat": _splat_pipeline(scene, cache, **text)}
    for pipe in out.values():
        pipe.eval()
        _vary_features(pipe.model)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["features", "splat"])
def test_viewer_text_box_adds_relevancy_outputs(text_pipelines, name):
    from test_viewer_panels import _camera, _mask_image

    from mvfm_nerfstudio.features import heatmap_rgb
    from mvfm_nerfstudio.models.build import ModelSpec
    from mvfm_nerfstudio.nerfstudio_plugin.viewer_panels import COLOUR_OUTPUTS, TEXT_OUTPUTS
    from mvfm_nerfstudio.text import text_tower_for

    pipe = text_pipelines[name]
    model, panels = pipe.model, pipe.model.feature_panels
    assert [s.title for s in panels.sections] == [None, "Click query", "Text query", "PCA colours"]
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    assert parse_object(pipe, ViewerElement, "Custom Elements") == []  # the panels install the text box themselves
    assert set(TEXT_OUTPUTS) <= set(COLOUR_OUTPUTS)  # Nerfstudio's colour options hidden for them
    cam = _camera(pipe, name)
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    assert not set(TEXT_OUTPUTS) & set(out) and panels.text_status == "none"

    panels.controls["text"].value = "red mug"  # typed into the text box, then "Find text"
    panels.controls["text_find"].cb_hook(panels.controls["text_find"])
    assert panels.text_query is not None and panels.text_status.startswith("'red mug'")
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    h, w = int(cam.height), int(cam.width)
    assert out["relevancy"].shape == (h, w, 3) and out["relevancy_segmentation"].shape == (h, w, 3)
    # the same numbers from an independently built tower (same backbone, random weights, seed) and the cache's basis
    store = pipe.datamanager.feature_store
    assert store.reduction_basis is not None and store.meta["backbone_feature_dim"] == 512
    tower = text_tower_for(ModelSpec(backbone="clip_vitb16", weights="random", tiny=True), device="cpu")
    rel = TextQuery.encode(tower, "red mug").relevancy(out["feature"], store.reduction_basis)
    assert torch.allclose(out["relevancy"], heatmap_rgb(rel, 0.0, 1.0))
    assert float(rel.max() - rel.min()) > 1e-3  # not a flat map
    for threshold in (float(rel.median()), float(rel.quantile(0.9))):
        slider = panels.controls["text_threshold"]
        slider.value = threshold
        slider.cb_hook(slider)
        with torch.no_grad():
            out = model.get_outputs_for_camera(cam)
        mask = rel >= threshold
        assert 0 < int(mask.sum()) < mask.numel()
        assert torch.allclose(out["relevancy_segmentation"], _mask_image(mask))
    assert not any(k.startswith("feature_panels") for k in model.state_dict())  # the tower stays out of checkpoints

    panels.controls["text_clear"].cb_hook(panels.controls["text_clear"])
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    assert panels.text_query is None and not set(TEXT_OUTPUTS) & set(out)
