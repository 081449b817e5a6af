"""Feature-store groupings that compute every view once ('partition', 'scene'), their cache keys, and pooling."""

from __future__ import annotations

import pytest
import torch

from conftest import orbit_cameras, randomize_adapters
from mvfm_nerfstudio import build_model, create_mvfm
from mvfm_nerfstudio.data import group_views
from mvfm_nerfstudio.feature_store import FeatureStore
from mvfm_nerfstudio.feature_store.extract import load_resized
from test_plugin_feature_store import H, N, W, _config, _source, _write_images


def test_partition_uses_every_view_once_in_full_sets_of_nearby_views():
    _, c2w = orbit_cameras(1, 10, H, W, seed=3)
    c2w = c2w[0].double()
    sets = group_views(c2w, 4, "partition")
    assert sets == group_views(c2w, 4, "partition")  # deterministic
    assert all(len(s) == 4 and list(s) == sorted(s) for s in sets)
    assert set().union(*sets) == set(range(10))
    assert sum(len(s) for s in sets) == 12 and len(sets) == 3  # only the last set re-uses (2) views
    # the first set is view 0 and its 3 nearest views
    assert sets[0] == group_views(c2w, 4, "neighbors")[0]


def test_scene_grouping_is_one_set_or_pose_compact_chunks():
    _, c2w = orbit_cameras(1, 10, H, W, seed=3)
    c2w = c2w[0].double()
    assert group_views(c2w, 4, "scene") == [tuple(range(10))]
    chunks = group_views(c2w, 4, "scene", max_views_per_pass=4)  # 10 views -> 3 chunks of <= 4
    assert len(chunks) == 3 and all(len(s) == 4 for s in chunks) and set().union(*chunks) == set(range(10))
    with pytest.raises(ValueError, match="max_views_per_pass"):
        group_views(c2w, 4, "scene", max_views_per_pass=0)


@pytest.mark.parametrize("kv_pool", [1, 2])
def test_scene_grouping_runs_one_knn_pass_over_all_views(tmp_path, kv_pool):
    paths = _write_images(tmp_path)
    torch.manual_seed(0)  # the store builds its random backbone with seed 0: same weights
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True)
    randomize_adapters(model, seed=1)
    ckpt = tmp_path / "adapters.safetensors"
    model.save_adapters(ckpt)
    cfg = _config(tmp_path, adapters=ckpt, feature_dim=None, view_grouping="scene", kv_pool=kv_pool)
    store = FeatureStore(cfg, _source(paths)).prepare()
    assert store.mvfm_forwards == 1 and store.meta["view_sets"] == [list(range(N))]

    built = build_model(cfg, **cfg.attention_options())
    assert (built.config.attention, built.config.num_neighbors, built.config.kv_pool) == ("knn", 2, kv_pool)
    size = (store.grid[0] * built.patch_size, store.grid[1] * built.patch_size)
    xs, ks = zip(*(load_resized(store.views, i, size) for i in range(N)))
    x = (torch.stack(xs) * 255).round() / 255  # the store keeps resized inputs as uint8
    with torch.no_grad():
        expected = built(x[None], torch.stack(ks)[None], store.views.cam_to_world.float()[None])[0]
        torch.manual_seed(0)
        global_ = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, adapters=str(ckpt))
        everyone = global_(x[None], torch.stack(ks)[None], store.views.cam_to_world.float()[None])[0]
    got = torch.stack([store.feature_map(i) for i in range(N)])
    assert torch.allclose(got, expected.permute(0, 2, 3, 1), atol=2e-2, rtol=1e-2)  # fp16 cache
    assert (expected - everyone).abs().max() > 1e-3  # 2 neighbours of 5 others: not global attention


def test_cache_key_tracks_grouping_and_pooling_but_keeps_old_keys(tmp_path):
    source = _source(_write_images(tmp_path))
    store = lambda **kw: FeatureStore(_config(tmp_path, **kw), source)  # noqa: E731
    # without pooling and with a set grouping, the options are those of entries made before kv_pool and
    # max_views_per_pass existed: such entries still hit
    old = store(view_grouping="neighbors", kv_pool=1).key_ingredients()["options"]
    assert "kv_pool" not in old and "max_views_per_pass" not in old
    assert store(view_grouping="neighbors", kv_pool=1, max_views_per_pass=8).cache_key() == \
        store(view_grouping="neighbors", kv_pool=1).cache_key()  # only used by 'scene'
    keys = {store(**kw).cache_key() for kw in (
        {}, dict(kv_pool=1), dict(max_views_per_pass=8), dict(view_grouping="partition"),
        dict(view_grouping="neighbors"), dict(view_grouping="neighbors", kv_pool=1))}
    assert len(keys) == 6
