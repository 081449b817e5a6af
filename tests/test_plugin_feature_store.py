"""FeatureStore: view grouping, multi-set averaging, content-keyed cache (hit / invalidation), pixel mapping.

No Nerfstudio here: the store is fed plain tensors (ViewSource), tiny random backbones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import orbit_cameras, randomize_adapters
from mvfm_nerfstudio import build_model, create_mvfm
from mvfm_nerfstudio.data import group_views
from mvfm_nerfstudio.feature_store import FeatureStore, FeatureStoreConfig, ViewSource
from mvfm_nerfstudio.feature_store.extract import load_resized
from mvfm_nerfstudio.geometry.feature_grid import grid_for_long_side, resize_map

N, H, W = 6, 45, 60


def _write_images(root, n=N, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = root / f"img{i}.png"
        Image.fromarray((rng.random((H, W, 3)) * 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def _source(paths):
    k, c2w = orbit_cameras(1, len(paths), H, W, seed=1)

    def load(i):
        return torch.from_numpy(np.array(Image.open(paths[i]))).float() / 255

    return ViewSource(paths, torch.tensor([[H, W]] * len(paths)), k[0].double(), c2w[0].double(), load,
                      scene_name="unit")


@pytest.fixture
def scene(tmp_path):
    paths = _write_images(tmp_path)
    return tmp_path, paths


def _config(tmp_path, **kw):
    base = dict(weights="random", tiny=True, feature_resolution=6, feature_dim=8, views_per_set=3,
                cache_dir=tmp_path / "cache")
    base.update(kw)
    return FeatureStoreConfig(**base)


def test_group_views_cover_every_view_deterministically():
    _, c2w = orbit_cameras(1, 9, H, W, seed=3)
    sets = group_views(c2w[0].double(), 4, "neighbors")
    assert sets == group_views(c2w[0].double(), 4, "neighbors")
    assert all(len(s) == 4 and len(set(s)) == 4 and list(s) == sorted(s) for s in sets)
    assert len(set(sets)) == len(sets) and set().union(*sets) == set(range(9))
    cover = group_views(c2w[0].double(), 4, "cover")
    assert set(cover) <= set(sets) and set().union(*cover) == set(range(9))
    assert len(cover) < len(sets)
    assert group_views(c2w[0, :2].double(), 4) == [(0, 1)]  # clipped to N
    with pytest.raises(ValueError, match="view_grouping"):
        group_views(c2w[0].double(), 4, "bogus")


def test_views_in_several_sets_get_the_average_of_their_set_features(scene, tmp_path):
    root, paths = scene
    torch.manual_seed(0)  # the store builds its random backbone with seed 0: same weights
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True)
    randomize_adapters(model, seed=1)  # non-identity adapters: a view's features depend on its set
    ckpt = tmp_path / "adapters.safetensors"
    model.save_adapters(ckpt)
    cfg = _config(tmp_path, adapters=ckpt, feature_dim=None, view_grouping="neighbors", kv_pool=1)
    store = FeatureStore(cfg, _source(paths)).prepare()
    sets = store.meta["view_sets"]
    assert store.mvfm_forwards == len(sets) and max(sum(v in s for s in sets) for v in range(N)) > 1

    built = build_model(cfg, **cfg.attention_options())
    size = (store.grid[0] * built.patch_size, store.grid[1] * built.patch_size)
    xs, ks = zip(*(load_resized(store.views, i, size) for i in range(N)))
    x = (torch.stack(xs) * 255).round() / 255  # the store keeps resized inputs as uint8
    k, c2w = torch.stack(ks), store.views.cam_to_world.float()
    total, count = torch.zeros(N, *store.grid, built.feature_dim), torch.zeros(N)
    with torch.no_grad():
        for s in sets:
            out = built(x[s][None], k[s][None], c2w[s][None])[0].permute(0, 2, 3, 1)
            for j, v in enumerate(s):
                total[v] += out[j]
                count[v] += 1
    expected = total / count[:, None, None, None]
    got = torch.stack([store.feature_map(i) for i in range(N)])
    assert torch.allclose(got, expected, atol=2e-2, rtol=1e-2)  # fp16 cache
    # and the sets really disagree: averaging is not a no-op
    v = max(range(N), key=lambda v: sum(v in s for s in sets))
    per_set = []
    with torch.no_grad():
        for s in sets:
            if v in s:
                per_set.append(built(x[s][None], k[s][None], c2w[s][None])[0, s.index(v)])
    assert (per_set[0] - per_set[1]).abs().max() > 1e-3


def test_cache_hit_then_invalidation_by_image_and_config(scene, tmp_path):
    root, paths = scene
    source = _source(paths)
    first = FeatureStore(_config(tmp_path), source).prepare()
    assert not first.cache_hit and first.mvfm_forwards > 0
    feats = np.array(first.features)
    assert first.features.dtype == np.float16 and first.features.shape == (N, *first.grid, 8)
    assert isinstance(first.features, np.memmap)

    again = FeatureStore(_config(tmp_path, sets_per_batch=2, device="cpu"), source).prepare()  # not in the key
    assert again.cache_hit and again.mvfm_forwards == 0 and again.path == first.path
    assert np.array_equal(np.array(again.features), feats)
    assert torch.equal(again.display_basis.components, first.display_basis.components)

    changed_cfg = FeatureStore(_config(tmp_path, feature_dim=4), source).prepare()
    assert not changed_cfg.cache_hit and changed_cfg.mvfm_forwards > 0 and changed_cfg.feature_dim == 4
    assert changed_cfg.path != first.path

    img = np.array(Image.open(paths[2]))
    img[0, 0] = 255 - img[0, 0]  # one pixel
    Image.fromarray(img).save(paths[2])
    changed_img = FeatureStore(_config(tmp_path), source).prepare()
    assert not changed_img.cache_hit and changed_img.mvfm_forwards > 0 and changed_img.path != first.path

    moved = _source(paths)
    moved.cam_to_world[0, 0, 3] += 0.5
    assert FeatureStore(_config(tmp_path), moved).cache_key() != changed_img.cache_key()
    assert not list((tmp_path / "cache").glob(".*partial*"))  # scratch files removed


def test_sampling_is_bilinear_with_pixel_centres(scene, tmp_path):
    _, paths = scene
    store = FeatureStore(_config(tmp_path), _source(paths))
    h, w = store.grid
    assert (h, w) == grid_for_long_side((H, W), 6) == (4, 6)
    # channel 0 = cell column, channel 1 = cell row: interpolation reproduces the continuous grid coordinate
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    ramp = np.zeros((N, h, w, 2), np.float16)
    ramp[..., 0], ramp[..., 1] = cols, rows
    store.features = ramp
    pix = torch.tensor([[1, 0, 0], [1, 44, 59], [3, 10, 20], [5, 22, 29], [0, 7, 4]])  # (image, row, col)
    got = store.sample_pixels(pix)
    gx = ((pix[:, 2] + 0.5) / W * w - 0.5).clamp(0, w - 1)
    gy = ((pix[:, 1] + 0.5) / H * h - 0.5).clamp(0, h - 1)
    assert torch.allclose(got, torch.stack([gx, gy], -1).float(), atol=1e-6)
    # the full-image upsampling uses the same mapping
    up = resize_map(torch.from_numpy(ramp[3].astype(np.float32)), (H, W))
    assert torch.allclose(up[10, 20], got[2], atol=1e-5)


def test_resized_intrinsics_keep_pixel_rays(scene, tmp_path):
    _, paths = scene
    store = FeatureStore(_config(tmp_path), _source(paths))
    size = (store.grid[0] * 14, store.grid[1] * 14)
    img, k_new = load_resized(store.views, 1, size)
    assert img.shape == (3, *size)
    k = store.views.intrinsics[1].double()
    u, v = torch.tensor([0.5, 40.5], dtype=torch.float64), torch.tensor([0.5, 20.5], dtype=torch.float64)  # pixel centres of the resized image
    new = torch.linalg.inv(k_new.double()) @ torch.stack([u, v, torch.ones_like(u)])
    orig = torch.linalg.inv(k) @ torch.stack([u * W / size[1], v * H / size[0], torch.ones_like(u)])
    assert torch.allclose(new, orig, atol=1e-6)


def test_bad_inputs_are_named(scene, tmp_path):
    _, paths = scene
    src = _source(paths)
    with pytest.raises(ValueError, match="intrinsics"):
        ViewSource(paths, src.image_sizes, src.intrinsics[:2], src.cam_to_world, src.load_image)
    wrong = ViewSource(paths, torch.tensor([[H + 1, W]] * N), src.intrinsics, src.cam_to_world, src.load_image)
    with pytest.raises(ValueError, match="img0.png"):
        FeatureStore(_config(tmp_path), wrong).prepare()
