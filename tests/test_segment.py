"""mvfm-segment and mvfm_nerfstudio.segmentation on a generated scene with ground-truth object ids.

Random-weight backbones (the only ones available offline) do not separate the textured objects
of the generated scenes (object IoU at chance), but they do separate the uniform sky. So:

* the end-to-end CLI test queries the sky with a tiny random MVFM (random non-zero adapters, so
  the multi-view sets run) and checks the masks against the ground-truth sky (object id 0);
* the per-object test feeds the segmentation "oracle" features (each cell's object-id
  histogram, i.e. what a perfect feature extractor at that grid resolution would give) and
  checks every object's masks in all views; features shifted by one cell must do clearly
  worse (the test sees misalignment).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_helpers import tiny_scene_path
from PIL import Image

from mvfm_nerfstudio.data import load_scene
from mvfm_nerfstudio.features import PCABasis
from mvfm_nerfstudio.geometry.feature_grid import resize_map, sample_map
from mvfm_nerfstudio.segmentation import (
    QueryFeature,
    load_query,
    mask_iou,
    otsu_threshold,
    pooled_otsu_threshold,
    query_in_space,
    save_query,
    segment_views,
)

SKY_QUERY = (64, 2)  # (column, row) of view 0: sky in the tiny generated scene (checked below)


@pytest.fixture(scope="module")
def scene():
    return load_scene(tiny_scene_path(0))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Random non-zero adapters for the tiny random backbone the feature store builds (seed 0)."""
    from conftest import randomize_adapters

    from mvfm_nerfstudio import create_mvfm

    torch.manual_seed(0)
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True)
    randomize_adapters(model, seed=0, scale=0.5)
    path = tmp_path_factory.mktemp("adapters") / "adapters.safetensors"
    model.save_adapters(path)
    return path


def _masks(out: Path, n: int) -> torch.Tensor:
    arrays = [np.array(Image.open(out / "masks" / f"frame_{i:05d}.png")) for i in range(n)]
    assert all(a.dtype == np.uint8 and set(np.unique(a)) <= {0, 255} for a in arrays)
    return torch.stack([torch.from_numpy(a) > 0 for a in arrays])


def test_cli_sky_masks_match_ground_truth_and_the_saved_query_reproduces_them(scene, adapters, tmp_path):
    from mvfm_nerfstudio.scripts.segment import entrypoint

    n, (h, w) = len(scene), scene.image_size(0)
    ids = scene.load_object_ids(range(n))
    assert int(ids[0, SKY_QUERY[1], SKY_QUERY[0]]) == 0
    common = ["--scene", str(scene.root), "--features.weights", "random", "--features.tiny",
              "--features.feature-resolution", "16", "--features.cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "sky"
    entrypoint(common + ["--features.adapters", str(adapters), "--query-view", "0", "--query-pixel",
                         *map(str, SKY_QUERY), "--output-dir", str(out)])
    summary = json.loads((out / "segment.json").read_text())
    assert summary["threshold_mode"] == "otsu" and summary["features"]["multi_view"] is True
    assert summary["feature_grid"] == [12, 16]
    masks = _masks(out, n)
    assert masks.shape == (n, h, w) and bool(masks[0, SKY_QUERY[1], SKY_QUERY[0]])
    ious = [mask_iou(masks[i], ids[i] == 0) for i in range(n)]
    # measured (scene grouping): mean 0.899, min 0.736 (views 0..7: .906 .736 .898 .952 .908 .942 .935 .918)
    assert np.mean(ious) >= 0.85 and min(ious) >= 0.65, ious
    assert all((out / "similarity" / f"frame_{i:05d}.png").is_file() for i in range(n))
    overview = np.array(Image.open(out / "overview.png"))
    assert overview.shape == (3 * 192, 3 * 256, 3)  # 8 thumbnails of 256x192 in a 3x3 grid
    saved = load_query(out / "query_feature.safetensors")
    assert saved.query.shape == (summary["feature_dim"],) and saved.metadata["view"] == "0"

    # the saved query reproduces the masks exactly ...
    again = tmp_path / "again"
    entrypoint(common + ["--features.adapters", str(adapters), "--query-feature", str(out / "query_feature.safetensors"),
                         "--output-dir", str(again)])
    assert torch.equal(_masks(again, n), masks)
    assert json.loads((again / "segment.json").read_text())["threshold"] == summary["threshold"]
    # ... and still finds the sky in another feature space (single-view base features reduced to 16 channels)
    other = tmp_path / "other"
    entrypoint(common + ["--features.feature-dim", "16", "--query-feature", str(out / "query_feature.safetensors"),
                         "--output-dir", str(other)])
    assert json.loads((other / "segment.json").read_text())["feature_dim"] == 16
    other_masks = _masks(other, n)
    assert np.mean([mask_iou(other_masks[i], ids[i] == 0) for i in range(n)]) >= 0.8


def _interior_pixel(mask: torch.Tensor):
    """(x, y) of a pixel deep inside ``mask [H, W]`` (last survivor of repeated 3x3 erosion)."""
    m = mask.float()[None, None]
    while True:
        eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
        if eroded.sum() == 0:
            break
        m = eroded
    ys, xs = torch.nonzero(m[0, 0] > 0, as_tuple=True)
    return int(xs[len(xs) // 2]), int(ys[len(ys) // 2])


def _oracle_object_ious(scene, ids: torch.Tensor, grid, shift: int = 0):
    """Per object: mean IoU over the views where the object or its mask is present."""
    n, (h_img, w_img) = len(scene), scene.image_size(0)
    onehot = F.one_hot(ids, int(ids.max()) + 1).permute(0, 3, 1, 2).float()
    maps = F.adaptive_avg_pool2d(onehot, grid).permute(0, 2, 3, 1).roll(shifts=shift, dims=2)  # [N, h, w, K]
    result = {}
    for k in range(1, maps.shape[-1]):
        view = int((ids == k).flatten(1).sum(1).argmax())
        x, y = _interior_pixel(ids[view] == k)
        query = sample_map(maps[view], torch.tensor([x + 0.5, y + 0.5]), (h_img, w_img))
        seg = segment_views(list(maps), scene.image_sizes, query)
        assert bool(seg.mask(view)[y, x]) or shift
        result[k] = float(np.mean([mask_iou(seg.mask(i), ids[i] == k) for i in range(n)
                                   if bool((ids[i] == k).any() or seg.mask(i).any())]))
    return result


def test_oracle_features_segment_every_object_in_every_view(scene):
    ids = scene.load_object_ids(range(len(scene)))
    ious = _oracle_object_ious(scene, ids, (24, 32))
    # measured (objects 1..6; 1 = ground): .961 .930 .876 .902 .923 .897
    assert len(ious) == 6 and min(ious.values()) >= 0.85, ious
    shifted = _oracle_object_ious(scene, ids, (24, 32), shift=1)  # measured mean 0.684
    assert np.mean(list(shifted.values())) <= np.mean(list(ious.values())) - 0.15, shifted


def test_sampling_and_upsampling_share_the_pixel_centre_convention():
    from mvfm_nerfstudio.feature_store import FeatureStore

    torch.manual_seed(0)
    fmap = torch.randn(6, 8, 5)
    size = (48, 80)
    # cell (i, j) is centred at pixel ((j + 0.5) W / w, (i + 0.5) H / h)
    for i, j in ((0, 0), (2, 5), (5, 7)):
        xy = torch.tensor([(j + 0.5) * 80 / 8, (i + 0.5) * 48 / 6])
        assert torch.allclose(sample_map(fmap, xy, size), fmap[i, j], atol=1e-5)
    # identical to the feature store's memory-mapped sampler
    store = FeatureStore.__new__(FeatureStore)
    store.features, store._resident = fmap[None].numpy(), None
    store.views = type("V", (), {"image_sizes": torch.tensor([list(size)])})()
    xy = torch.rand(50, 2) * torch.tensor([80.0, 48.0])
    expected = store.sample(torch.zeros(50, dtype=torch.long), xy.double())
    assert torch.allclose(sample_map(fmap, xy, size), expected, atol=1e-5)
    # and the upsampled map holds each cell's value at the cell's centre pixel (5x5 pixels per cell: the centre
    # (i + 0.5) * 5 is the centre of pixel row 5 i + 2)
    up = resize_map(fmap[..., 0], (30, 40))
    assert torch.allclose(up[torch.arange(6) * 5 + 2][:, torch.arange(8) * 5 + 2], fmap[..., 0], atol=1e-5)


def test_otsu_threshold_splits_two_modes_and_takes_the_middle_of_a_gap():
    values = torch.cat([torch.full((700,), -0.2), torch.full((300,), 0.6)])
    hist = torch.histc(values, bins=200, min=-1, max=1)
    t = otsu_threshold(hist)
    assert -0.2 < t < 0.6 and t == pytest.approx(0.2, abs=0.02)
    noisy = torch.cat([torch.randn(5000) * 0.05 + 0.1, torch.randn(1000) * 0.05 + 0.8]).clamp(-1, 1)
    t = otsu_threshold(torch.histc(noisy, bins=512, min=-1, max=1))
    assert 0.25 < t < 0.65
    with pytest.raises(ValueError, match="empty"):
        otsu_threshold(torch.zeros(10))
    seg = segment_views([torch.randn(3, 4, 8)], torch.tensor([[6, 8]]), torch.randn(8), threshold=0.3)
    assert seg.threshold_mode == "fixed" and torch.equal(seg.mask(0), seg.similarity(0) >= 0.3)
    with pytest.raises(ValueError, match="cosine"):
        segment_views([torch.randn(3, 4, 8)], torch.tensor([[6, 8]]), torch.randn(8), threshold=2.0)


def test_pooled_otsu_bins_over_the_values_range_so_a_narrow_spread_still_splits():
    """Near-constant features (a barely trained field): every similarity in 0.996..1.0. Binned over [-1, 1] the
    values fill one bin and its upper edge (1.0) selects nothing, which is how an export of a 3-step run failed."""
    g = torch.Generator().manual_seed(0)
    values = torch.cat([0.9962 + 0.0004 * torch.rand(700, generator=g), 0.9994 + 0.0005 * torch.rand(300, generator=g)])
    old = otsu_threshold(torch.histc(values.double(), bins=512, min=-1, max=1))
    assert (values >= old).sum() in (0, len(values))  # the fixed [-1, 1] bins cannot split this spread
    low, high = float(values.min()), float(values.max())
    t = pooled_otsu_threshold([values], low, high)
    assert 0.9966 < t < 0.9994 and int((values >= t).sum()) == 300
    # chunks pool to the same histogram as one tensor; the result is strictly inside the range
    assert pooled_otsu_threshold([values[:123], values[123:]], low, high) == t and low < t < high
    assert pooled_otsu_threshold([torch.full((5,), 0.3)], 0.3, 0.3) == 0.3  # nothing to split: all selected
    assert otsu_threshold(torch.tensor([0.0, 4.0, 0.0, 0.0])) == pytest.approx(-0.5)  # one bin: its lower edge
    with pytest.raises(ValueError, match="finite and ordered"):
        pooled_otsu_threshold([values], float("nan"), 1.0)
    # segment_views on features that are nearly parallel to the query: both masks parts are non-empty
    query = torch.randn(8, generator=g)
    fmap = query + 0.02 * torch.randn(6, 8, 8, generator=g)
    fmap[:3] += 0.02 * torch.randn(8, generator=g)
    seg = segment_views([fmap], torch.tensor([[12, 16]]), query)
    assert seg.threshold_mode == "otsu" and 0 < int(seg.mask(0).sum()) < 12 * 16


def test_query_files_round_trip_and_move_between_feature_spaces(tmp_path):
    torch.manual_seed(0)
    d_full, d = 12, 4

    def basis():
        q, _ = torch.linalg.qr(torch.randn(d_full, d_full))
        return PCABasis(torch.randn(d_full), q[:d].contiguous(), -torch.ones(d), torch.ones(d))

    a, b = basis(), basis()
    full = torch.randn(d_full)
    q_a = a.project(full)
    path = tmp_path / "q.safetensors"
    save_query(path, QueryFeature(q_a, a.unproject(q_a), {"backbone": "x", "feature_space": "A", "reduced": "1"}))
    loaded = load_query(path)
    assert torch.equal(loaded.query, q_a) and loaded.metadata["feature_space"] == "A"
    assert torch.equal(query_in_space(loaded, "A", "x", d, a, "q"), q_a)  # same space: unchanged
    moved = query_in_space(loaded, "B", "x", d, b, "q")  # other space: through the full feature
    assert torch.allclose(moved, b.project(a.unproject(q_a)), atol=1e-5)
    with pytest.raises(ValueError, match="backbone 'x'"):
        query_in_space(loaded, "B", "y", d, b, "q")
    bare = QueryFeature(q_a, None, {"backbone": "x", "feature_space": "A", "reduced": "1"})
    with pytest.raises(ValueError, match="query_full"):
        query_in_space(bare, "B", "x", d, b, "q")
    unreduced = QueryFeature(full, None, {"backbone": "x", "feature_space": "C", "reduced": "0"})
    assert torch.allclose(query_in_space(unreduced, "B", "x", d, b, "q"), b.project(full))
    assert torch.equal(query_in_space(unreduced, "D", "x", d_full, None, "q"), full)
    assert torch.equal(query_in_space(QueryFeature(q_a, None, {}), "B", "x", d, b, "q"), q_a)  # bare file
    with pytest.raises(ValueError, match="has 4 channels"):
        query_in_space(QueryFeature(q_a, None, {}), "D", "x", d_full, None, "q")
    from safetensors.torch import save_file

    save_file({"feature": q_a}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no 'query' tensor"):
        load_query(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("args, message", [
    ([], "exactly one query"),
    (["--query-view", "0"], "needs both"),
    (["--query-view", "9", "--query-pixel", "1", "1"], "out of range"),
    (["--query-view", "0", "--query-pixel", "128", "1"], "outside view 0"),
])
def test_cli_errors_name_the_bad_query(scene, tmp_path, args, message):
    from mvfm_nerfstudio.segmentation import SegmentConfig, segment_scene

    import tyro

    config = tyro.cli(SegmentConfig, args=["--scene", str(scene.root), "--output-dir", str(tmp_path), *args])
    with pytest.raises(ValueError, match=message):
        segment_scene(config)
    assert not any(tmp_path.iterdir())  # nothing computed or written


def test_overview_marks_the_query_and_subsamples_many_views():
    from mvfm_nerfstudio.segmentation import overview_image
    from mvfm_nerfstudio.segmentation.tool import _overview_views

    assert _overview_views(5, 48, 2) == [0, 1, 2, 3, 4]
    picked = _overview_views(300, 10, 123)
    assert len(picked) == 10 and 123 in picked and picked[0] == 0 and picked[-1] == 299
    img = torch.zeros(3, 40, 60)
    mask = torch.zeros(40, 60, dtype=torch.bool)
    mask[10:30, 20:40] = True
    sheet = overview_image(lambda i: img, lambda i: mask, [0, 1], ["a", "b"], 0, (50.0, 35.0), thumb_width=60)
    assert sheet.shape == (40, 120, 3)
    assert math.isclose(sheet[20, 30, 0] / 255, 0.55, abs_tol=0.02) and sheet[20, 30, 2] < 30  # tinted mask
    assert sheet[20, 5].sum() == 0 and sheet[5, 55].sum() == 0  # black outside the mask
    assert tuple(sheet[10, 30]) == (255, 64, 26)  # outlined (boundary pixel in the mask colour)
    rows, cols = np.nonzero((sheet[14:, :60] != sheet[14:, 60:]).any(-1))  # below the labels
    assert len(rows) > 0 and np.hypot(rows + 14 - 35, cols - 50).max() <= 8  # only the query marker differs
