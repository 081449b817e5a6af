"""mvfm-export on 3-iteration CPU runs of both methods: every file is read back and checked against the model.

One tiny generated scene and one short run per method (Nerfstudio's Trainer, random tiny backbone) are shared
by the module; each run is opened once with :func:`mvfm_nerfstudio.export.load_run`, as the CLI does.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nerfstudio")
from plyfile import PlyData  # noqa: E402

from mvfm_nerfstudio.export import (  # noqa: E402
    ExportPointCloud, ExportSegment, ExportViews, RunError, load_run, pixel_ray, voxel_downsample,
)
from mvfm_nerfstudio.export.points import FeaturePoints, gaussian_features, opacities  # noqa: E402
from mvfm_nerfstudio.features import cosine_similarity  # noqa: E402
from mvfm_nerfstudio.segmentation.query import QueryFeature, load_query, save_query  # noqa: E402
from mvfm_nerfstudio.utils.runtime import torch_threads  # noqa: E402

pytestmark = pytest.mark.slow

QUERY_VIEW, QUERY_PIXEL = 2, (60.0, 40.0)
NERF_DOWNSCALE = 8.0  # 12 x 16 renders: nerfacto's CPU hash grids are slow


def _vertex(path: Path):
    return PlyData.read(str(path))["vertex"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """nerfacto on the CPU is many small ops: one thread is as fast, and much faster on a busy machine."""
    with torch_threads(1):
        yield


def _train(config, scene: Path, out: Path) -> Path:
    config.experiment_name = "export"
    config.output_dir = out
    config.timestamp = "run"
    config.max_num_iterations = 3
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    config.vis = "tensorboard"
    dm = config.pipeline.datamanager
    dm.data = dm.dataparser.data = scene
    f = dm.features
    f.weights, f.tiny, f.feature_resolution, f.feature_dim, f.cache_dir = "random", True, 8, 16, out / "cache"
    config.save_config()
    from nerfstudio.scripts.train import train_loop

    train_loop(local_rank=0, world_size=1, config=config)  # what ns-train runs, seeding random / numpy / torch
    return config.get_base_dir() / "config.yml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"features": LoadedRun, "splat": LoadedRun}``: 3-iteration CPU runs, opened from their config.yml."""
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features_config
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat_config

    root = tmp_path_factory.mktemp("export")
    scene = make_scene(tiny_config(seed=0), root / "scene", progress=False)
    nerf = mvfm_features_config()
    dm, m = nerf.pipeline.datamanager, nerf.pipeline.model
    dm.train_num_rays_per_batch = dm.eval_num_rays_per_batch = 128
    m.num_nerf_samples_per_ray, m.num_proposal_samples_per_ray = 16, (32, 16)
    m.num_levels, m.log2_hashmap_size, m.max_res = 8, 14, 256
    m.feature_num_levels, m.feature_log2_hashmap_size = 6, 12
    m.eval_num_rays_per_chunk = 1 << 12
    splat = mvfm_splat_config()
    splat.pipeline.model.num_random, splat.pipeline.model.random_scale = 500, 0.6
    paths = {"features": _train(nerf, scene, root / "runs"), "splat": _train(splat, scene, root / "runs")}
    return {name: load_run(path, device="cpu") for name, path in paths.items()}


@pytest.fixture(scope="module")
def nerf_cloud(runs, tmp_path_factory):
    """The mvfm-features point cloud (float32 features, also as ply properties) and its directory."""
    out = tmp_path_factory.mktemp("nerf_cloud")
    opts = ExportPointCloud(load_config=runs["features"].config_path, output_dir=out, downscale=NERF_DOWNSCALE,
                            feature_dtype="float32", ply_features=True)
    return opts.export(runs["features"]), out


# ------------------------------------------------------------------------------------------ point clouds


def test_splat_point_cloud_holds_every_visible_gaussian_with_its_feature_and_pca_colour(runs, tmp_path):
    run = runs["splat"]
    model = run.model
    summary = ExportPointCloud(load_config=run.config_path, output_dir=tmp_path).export(run)
    v = _vertex(tmp_path / "pointcloud.ply")
    assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue", "gaussian"]
    expected = torch.nonzero(opacities(model) >= 1 / 255).flatten()
    assert 0 < len(expected) and v.count == len(expected) == summary["points"]
    assert np.array_equal(v["gaussian"], expected.numpy())
    xyz = np.stack([v["x"], v["y"], v["z"]], -1)
    assert np.allclose(xyz, model.means[expected].detach().numpy(), atol=1e-6)
    feats = np.load(tmp_path / "pointcloud_features.npy")
    assert feats.dtype == np.float16 and feats.shape == (v.count, model.feature_dim)
    reference = gaussian_features(model)[expected]
    assert np.allclose(feats.astype(np.float32), reference.numpy(), atol=2e-3, rtol=1e-3)
    rgb = np.stack([v["red"], v["green"], v["blue"]], -1).astype(int)
    pca = np.round(model.feature_display.basis.to_rgb(reference).numpy() * 255)
    assert np.abs(rgb - pca).max() <= 1
    meta = json.loads((tmp_path / "pointcloud.json").read_text())
    assert meta["method"] == "mvfm-splat" and meta["features"] == "pointcloud_features.npy"
    assert meta["feature_cache"] == str(run.feature_store.path) and run.feature_store.cache_hit


def test_a_gaussians_exported_feature_is_what_it_renders_on_its_own(runs):
    """A pixel covered by one Gaussian alone renders decoder(latent) (alpha-normalised): render 3 of them."""
    model = runs["splat"].model
    feats = gaussian_features(model)
    saved = {k: v for k, v in model.gauss_params.items()}
    try:
        for i in (0, 7, 123):
            model.gauss_params = torch.nn.ParameterDict({k: torch.nn.Parameter(v[i : i + 1].detach().clone())
                                                         for k, v in saved.items()})
            model.gauss_params["opacities"].data.fill_(3.0)
            centre = model.means[0].detach()
            origin = centre + torch.tensor([0.0, 0.0, 2.0])
            rendered = model.feature_at_ray(origin, centre - origin)
            assert torch.allclose(rendered, feats[i], atol=1e-5), i
    finally:
        model.gauss_params = torch.nn.ParameterDict(saved)
    assert model.num_points == len(feats)


def test_nerf_point_cloud_points_are_rendered_surface_points_with_their_features(runs, nerf_cloud):
    run = runs["features"]
    model = run.model
    summary, out = nerf_cloud
    v = _vertex(out / "pointcloud.ply")
    names = [p.name for p in v.properties]
    d = model.feature_dim
    assert names == ["x", "y", "z", "red", "green", "blue", "view", "row", "col"] + [f"feature_{k}" for k in range(d)]
    assert v.count == summary["points"] > 0
    feats = np.load(out / "pointcloud_features.npy")
    assert feats.dtype == np.float32 and feats.shape == (v.count, d)
    assert np.array_equal(np.stack([v[f"feature_{k}"] for k in range(d)], -1), feats)
    assert set(np.unique(v["view"])) == set(range(len(run.train_cameras)))
    # re-render 6 of the points one ray at a time: same feature, same surface point
    xyz = np.stack([v["x"], v["y"], v["z"]], -1)
    for k in np.linspace(0, v.count - 1, 6).astype(int):
        cam = run.train_cameras[int(v["view"][k]) : int(v["view"][k]) + 1]
        cam.rescale_output_resolution(1 / NERF_DOWNSCALE)
        ray = cam.generate_rays(camera_indices=0, coords=torch.tensor([[v["row"][k] + 0.5, v["col"][k] + 0.5]]))
        feature, depth = model.feature_at_ray(ray.origins[0], ray.directions[0], with_depth=True)
        assert torch.allclose(feature, torch.from_numpy(feats[k]), atol=1e-4), k
        point = ray.origins[0] + depth * ray.directions[0] / ray.directions[0].norm()
        assert np.allclose(point.numpy(), xyz[k], atol=1e-4), k
    rgb = np.stack([v["red"], v["green"], v["blue"]], -1).astype(int)
    pca = np.round(model.feature_display.basis.to_rgb(torch.from_numpy(feats)).numpy() * 255)
    assert np.abs(rgb - pca).max() <= 1


def test_voxel_pooling_averages_the_points_of_each_voxel(runs, nerf_cloud, tmp_path):
    pts = FeaturePoints(
        positions=torch.tensor([[0.1, 0.1, 0.1], [0.3, 0.2, 0.4], [1.2, 0.1, 0.1], [-0.1, 0.0, 0.0]]),
        features=torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [7.0, 1.0]]),
        rgb=torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]),
    )
    pooled = voxel_downsample(pts, 0.5)  # voxels (-1,0,0): point 3; (0,0,0): points 0, 1; (2,0,0): point 2
    assert torch.allclose(pooled.positions, torch.tensor([[-0.1, 0.0, 0.0], [0.2, 0.15, 0.25], [1.2, 0.1, 0.1]]))
    assert torch.allclose(pooled.features, torch.tensor([[7.0, 1.0], [2.0, 1.0], [5.0, 5.0]]))
    assert torch.allclose(pooled.rgb[1], torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="voxel size must be > 0"):
        voxel_downsample(pts, 0.0)
    # through the export: fewer points, one per occupied voxel of the full cloud
    run = runs["features"]
    full = np.load(nerf_cloud[1] / "pointcloud_features.npy")
    xyz = _vertex(nerf_cloud[1] / "pointcloud.ply")
    xyz = np.stack([xyz["x"], xyz["y"], xyz["z"]], -1).astype(np.float64)
    size = float(np.ptp(xyz, axis=0).max() / 8)  # the untrained NeRF's surface spreads far: 8 voxels across
    cells = np.unique(np.floor(xyz / size), axis=0)
    summary = ExportPointCloud(load_config=run.config_path, output_dir=tmp_path, downscale=NERF_DOWNSCALE,
                               voxel_size=size).export(run)
    v = _vertex(tmp_path / "pointcloud.ply")
    assert v.count == summary["points"] == len(cells) < len(full)
    assert [p.name for p in v.properties] == ["x", "y", "z", "red", "green", "blue"]


# ------------------------------------------------------------------------------------------ segmentation

GS_PROPERTIES_SH1 = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(9)]
                     + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def test_splat_segment_is_exactly_the_gaussians_above_the_threshold(runs, tmp_path):
    run = runs["splat"]
    model = run.model
    origin, direction = pixel_ray(run.train_cameras, QUERY_VIEW, QUERY_PIXEL)
    query = model.feature_at_ray(origin, direction)
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)["pipeline"]
    params = {k.split(".")[-1]: v for k, v in state.items() if k.startswith("_model.gauss_params.")}
    sim = cosine_similarity(gaussian_features(model), query)[:, 0]
    visible = torch.sigmoid(params["opacities"][:, 0]) >= 1 / 255
    threshold = float(sim[visible].median())
    expected = torch.nonzero((sim >= threshold) & visible).flatten()

    summary = ExportSegment(load_config=run.config_path, output_dir=tmp_path, query_view=QUERY_VIEW,
                            query_pixel=QUERY_PIXEL, threshold=threshold).export(run)
    assert summary["threshold_mode"] == "fixed" and summary["gaussians"] == len(expected) > 0
    assert np.array_equal(np.load(tmp_path / "segment_gaussians.npy"), expected.numpy())
    v = _vertex(tmp_path / "segment.ply")
    assert model.config.sh_degree == 3 or [p.name for p in v.properties] == GS_PROPERTIES_SH1
    k = (model.config.sh_degree + 1) ** 2 - 1
    assert [p.name for p in v.properties] == (GS_PROPERTIES_SH1[:9] + [f"f_rest_{i}" for i in range(3 * k)]
                                              + GS_PROPERTIES_SH1[-8:])
    assert all(p.val_dtype == "f4" for p in v.properties) and v.count == len(expected)
    e = expected

    def col(*names):
        return np.stack([v[n] for n in names], -1)

    assert np.allclose(col("x", "y", "z"), params["means"][e].numpy())
    assert np.allclose(col("f_dc_0", "f_dc_1", "f_dc_2"), params["features_dc"][e].numpy())
    rest = params["features_rest"][e].transpose(1, 2).reshape(len(e), -1).numpy()  # channel-major (Inria layout)
    assert np.allclose(col(*[f"f_rest_{i}" for i in range(3 * k)]), rest)
    assert np.allclose(v["opacity"], params["opacities"][e, 0].numpy())
    assert np.allclose(col("scale_0", "scale_1", "scale_2"), params["scales"][e].numpy())
    assert np.allclose(col("rot_0", "rot_1", "rot_2", "rot_3"), params["quats"][e].numpy())
    assert not np.any(col("nx", "ny", "nz"))
    feats = np.load(tmp_path / "segment_features.npy").astype(np.float32)
    assert np.allclose(feats, gaussian_features(model)[e].numpy(), atol=2e-3, rtol=1e-3)
    saved = load_query(tmp_path / "query_feature.safetensors")
    assert torch.allclose(saved.query, query) and saved.metadata["feature_space"] == run.feature_store.path.name
    assert saved.metadata["pixel_xy"] == json.dumps(list(QUERY_PIXEL))


def test_splat_segment_of_everything_equals_nerfstudios_gaussian_splat_export(runs, tmp_path, monkeypatch):
    """Threshold -1 keeps every visible Gaussian: the file must match ns-export gaussian-splat's, column by column.

    Nerfstudio's exporter runs on the same loaded pipeline: its ``eval_setup`` (whose module imports every
    Nerfstudio method, ~40 s on a busy 2-core machine) is replaced by one returning the run, and its top-level
    ``import open3d`` (unused by the splat export; open3d needs libusb) by an empty module where open3d fails.
    """
    import importlib

    run = runs["splat"]
    try:
        import open3d  # noqa: F401
    except ImportError:
        monkeypatch.setitem(sys.modules, "open3d", types.ModuleType("open3d"))
    eval_utils = types.ModuleType("nerfstudio.utils.eval_utils")
    eval_utils.eval_setup = lambda *args, **kwargs: (run.config, run.pipeline, run.checkpoint, run.step)
    monkeypatch.setitem(sys.modules, "nerfstudio.utils.eval_utils", eval_utils)
    monkeypatch.delitem(sys.modules, "nerfstudio.scripts.exporter", raising=False)
    try:
        exporter = importlib.import_module("nerfstudio.scripts.exporter")
        exporter.ExportGaussianSplat(load_config=run.config_path, output_dir=tmp_path / "ns").main()
    finally:
        sys.modules.pop("nerfstudio.scripts.exporter", None)  # the copy bound to the stand-in eval_setup
    ExportSegment(load_config=run.config_path, output_dir=tmp_path / "ours", query_view=QUERY_VIEW,
                  query_pixel=QUERY_PIXEL, threshold=-1.0).export(run)
    ours, theirs = _vertex(tmp_path / "ours" / "segment.ply"), _vertex(tmp_path / "ns" / "splat.ply")
    assert [p.name for p in ours.properties] == [p.name for p in theirs.properties]
    assert ours.count == theirs.count == len(np.load(tmp_path / "ours" / "segment_gaussians.npy"))
    for p in theirs.properties:
        assert np.array_equal(ours[p.name], theirs[p.name]), p.name


def test_nerf_segment_is_the_point_cloud_above_the_threshold(runs, nerf_cloud, tmp_path):
    run = runs["features"]
    model = run.model
    origin, direction = pixel_ray(run.train_cameras, QUERY_VIEW, QUERY_PIXEL)
    query = model.feature_at_ray(origin, direction)
    cloud = torch.from_numpy(np.load(nerf_cloud[1] / "pointcloud_features.npy"))
    sim = cosine_similarity(cloud, query)[:, 0]
    summary = ExportSegment(load_config=run.config_path, output_dir=tmp_path, query_view=QUERY_VIEW,
                            query_pixel=QUERY_PIXEL, downscale=NERF_DOWNSCALE, feature_dtype="float32").export(run)
    assert summary["threshold_mode"] == "otsu" and -1 < summary["threshold"] < 1
    expected = sim >= summary["threshold"]
    v = _vertex(tmp_path / "segment.ply")
    full = _vertex(nerf_cloud[1] / "pointcloud.ply")
    assert 0 < v.count == int(expected.sum()) < full.count
    for name in ("x", "y", "z", "view", "row", "col"):
        assert np.array_equal(v[name], full[name][expected.numpy()]), name
    assert np.allclose(np.load(tmp_path / "segment_features.npy"), cloud[expected].numpy(), atol=1e-6)


# ------------------------------------------------------------------------------------------ views


def _camera_path(cameras, views) -> dict:
    """A Nerfstudio camera path json through the given training cameras (same pose and field of view)."""
    h, w = int(cameras.height[0]), int(cameras.width[0])
    frames = []
    for i in views:
        c2w = torch.cat([cameras.camera_to_worlds[i], torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
        fov = math.degrees(2 * math.atan(h / (2 * float(cameras.fy[i]))))
        frames.append({"camera_to_world": c2w.flatten().tolist(), "fov": fov, "aspect": w / h})
    return {"render_height": h, "render_width": w, "camera_path": frames, "seconds": 1.0}


def test_views_write_features_colours_similarity_and_masks(runs, tmp_path):
    run = runs["splat"]
    model = run.model
    summary = ExportViews(load_config=run.config_path, output_dir=tmp_path, views=[0, QUERY_VIEW],
                          query_view=QUERY_VIEW, query_pixel=QUERY_PIXEL).export(run)
    from PIL import Image

    query = load_query(tmp_path / "query_feature.safetensors").query
    assert summary["threshold_mode"] == "otsu" and [r["name"] for r in summary["views"]] == [
        "00000_frame_00000", f"{QUERY_VIEW:05d}_frame_{QUERY_VIEW:05d}"]
    for row in summary["views"]:
        feats = np.load(tmp_path / row["features"])
        assert feats.dtype == np.float16 and feats.shape == (96, 128, model.feature_dim)
        f = torch.from_numpy(feats.astype(np.float32))
        pca = np.asarray(Image.open(tmp_path / row["pca"]))
        assert pca.shape == (96, 128, 3)
        assert np.abs(pca.astype(int) - np.round(model.feature_display.basis.to_rgb(f).numpy() * 255)).max() <= 2
        sim = np.load(tmp_path / "similarity" / f"{row['name']}.npy")
        assert sim.dtype == np.float32  # the values the masks were cut from (float16 would round across the cut)
        assert np.allclose(sim, cosine_similarity(f, query)[..., 0].numpy(), atol=2e-3)
        mask = np.asarray(Image.open(tmp_path / row["mask"]))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        exact = np.load(tmp_path / "similarity" / f"{row['name']}.npy") >= summary["threshold"]
        assert np.array_equal(mask == 255, exact) and abs(row["mask_fraction"] - exact.mean()) < 1e-6
        assert np.asarray(Image.open(tmp_path / row["similarity"])).shape == (96, 128, 3)
    # the query view's pixel: the rendered map there is close to the ray's feature (splats: blur of 0.3 px)
    sim_q = np.load(tmp_path / "similarity" / f"{QUERY_VIEW:05d}_frame_{QUERY_VIEW:05d}.npy")
    assert sim_q[int(QUERY_PIXEL[1]), int(QUERY_PIXEL[0])] > 0.9

    # a camera path through the same two cameras renders the same features
    path = tmp_path / "path.json"
    path.write_text(json.dumps(_camera_path(run.train_cameras, [0, QUERY_VIEW])))
    along = ExportViews(load_config=run.config_path, output_dir=tmp_path / "path", camera_path=path).export(run)
    assert [r["name"] for r in along["views"]] == ["frame_00000", "frame_00001"] and "threshold" not in along
    for a, b in zip(along["views"], summary["views"]):
        fa = torch.from_numpy(np.load(tmp_path / "path" / a["features"]).astype(np.float32))
        fb = torch.from_numpy(np.load(tmp_path / b["features"]).astype(np.float32))
        assert fa.shape == fb.shape
        assert float(torch.nn.functional.cosine_similarity(fa, fb, dim=-1).mean()) > 0.999
    assert not (tmp_path / "path" / "masks").exists()


def test_nerf_views_agree_with_the_point_cloud(runs, nerf_cloud, tmp_path):
    run = runs["features"]
    summary = ExportViews(load_config=run.config_path, output_dir=tmp_path, views=[1],
                          downscale=NERF_DOWNSCALE).export(run)
    feats = np.load(tmp_path / summary["views"][0]["features"]).astype(np.float32)
    v = _vertex(nerf_cloud[1] / "pointcloud.ply")
    cloud = np.load(nerf_cloud[1] / "pointcloud_features.npy")
    sel = v["view"] == 1
    assert sel.any()
    assert np.allclose(feats[v["row"][sel], v["col"][sel]], cloud[sel], atol=2e-3, rtol=1e-3)


# ------------------------------------------------------------------------------------------ CLI and errors


def test_cli_writes_a_segment_and_explains_bad_input(runs, tmp_path, capsys, monkeypatch):
    from mvfm_nerfstudio.scripts.export import entrypoint

    run = runs["splat"]
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as info:
        entrypoint(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr()
    assert all(name in out.out + out.err for name in ("pointcloud", "segment", "views")), out

    with pytest.raises(SystemExit) as info:
        entrypoint(["pointcloud", "--load-config", str(tmp_path / "nope" / "config.yml")])
    assert info.value.code == 2
    assert f"run config {tmp_path / 'nope' / 'config.yml'} does not exist" in capsys.readouterr().err
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    (empty_run / "config.yml").write_text(run.config_path.read_text())
    with pytest.raises(RunError, match="no checkpoint"):
        load_run(empty_run / "config.yml", device="cpu")
    (empty_run / "config.yml").write_text("a: 1\n")
    with pytest.raises(RunError, match="not a Nerfstudio run config"):
        load_run(empty_run, device="cpu")

    def segment(**kw):
        return ExportSegment(load_config=run.config_path, output_dir=tmp_path / "seg", **kw).export(run)

    with pytest.raises(ValueError, match=r"--query-pixel 128 5 is outside training view 2 \(128x96 pixels"):
        segment(query_view=2, query_pixel=(128, 5))
    with pytest.raises(ValueError, match="--query-view 8 is out of range: the run has 8 training views"):
        segment(query_view=8, query_pixel=(1, 1))
    with pytest.raises(ValueError, match="exactly one query"):
        segment()
    q = tmp_path / "random_query.safetensors"
    random_query = torch.randn(run.model.feature_dim, generator=torch.Generator().manual_seed(0))
    save_query(q, QueryFeature(random_query, None, {}))
    with pytest.raises(ValueError, match=r"empty segmentation: no Gaussian has similarity >= 1\.000 .*lower --threshold"):
        segment(query_feature=q, threshold=1.0)
    wrong = tmp_path / "wrong.safetensors"
    save_query(wrong, QueryFeature(torch.randn(5), None, {}))
    with pytest.raises(ValueError, match="has 5 channels"):
        segment(query_feature=wrong)
    assert not (tmp_path / "seg").exists()  # nothing is written before the query and the segment are valid

    entrypoint(["segment", "--load-config", str(run.config_path), "--output-dir", str(tmp_path / "cli"),
                "--query-feature", str(q), "--threshold", "-1", "--device", "cpu"])
    assert (tmp_path / "cli" / "segment.ply").is_file() and (tmp_path / "cli" / "segment.json").is_file()


# ------------------------------------------------------------------------------------------ text queries


def test_splat_text_segment_is_exactly_the_gaussians_whose_relevancy_passes(tmp_path_factory):
    """A 3-iteration mvfm-splat run on text-space features (random tiny CLIP: mechanics only, not meaning): the
    exported Gaussians are exactly those whose LERF relevancy, computed with an independently built text tower,
    is >= the threshold; a run without text-space features is refused naming the option."""
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config
    from mvfm_nerfstudio.export.points import gaussian_features
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat_config
    from mvfm_nerfstudio.text import create_text_tower, relevancy_for_query

    root = tmp_path_factory.mktemp("export_text")
    scene = make_scene(tiny_config(seed=0), root / "scene", progress=False)
    config = mvfm_splat_config()
    config.pipeline.model.num_random, config.pipeline.model.random_scale = 500, 0.6
    features = config.pipeline.datamanager.features
    features.backbone, features.text_space = "clip_vitb16", True
    torch.manual_seed(0)
    path = _train(config, scene, root / "runs")
    run = load_run(path, device="cpu")
    model, store = run.model, run.feature_store
    tower = create_text_tower("clip_vitb16", "random", tiny=True, seed=store.config.model_seed, device="cpu")
    rel = relevancy_for_query(gaussian_features(model), "red mug", tower, store.reduction_basis)
    visible = opacities(model) >= 1 / 255
    threshold = float(rel[visible].median())
    expected = torch.nonzero((rel >= threshold) & visible).flatten()

    out = tmp_path_factory.mktemp("text_segment")
    summary = ExportSegment(load_config=run.config_path, output_dir=out, query_text="red mug",
                            threshold=threshold).export(run)
    assert summary["query"] == "text 'red mug'" and summary["gaussians"] == len(expected) > 0
    assert np.array_equal(np.load(out / "segment_gaussians.npy"), expected.numpy())
    saved = load_query(out / "query_feature.safetensors")  # the phrase's exact embedding, not its PCA projection
    torch.testing.assert_close(saved.query_full, tower.encode(["red mug"])[0].float().cpu(), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"--threshold is a relevancy in \[0, 1\]"):
        ExportSegment(load_config=run.config_path, output_dir=out, query_text="red mug", threshold=-0.5).export(run)


def test_text_query_on_a_run_without_text_space_features_is_refused(runs, tmp_path):
    from mvfm_nerfstudio.errors import NoTextTowerError

    run = runs["splat"]  # dinov2 features: no text tower
    with pytest.raises((NoTextTowerError, ValueError), match="not in CLIP's text space.*text-space True"):
        ExportSegment(load_config=run.config_path, output_dir=tmp_path, query_text="red mug").export(run)
    with pytest.raises(ValueError, match="exactly one query"):
        ExportSegment(load_config=run.config_path, output_dir=tmp_path, query_text="mug", query_view=0,
                      query_pixel=(1.0, 1.0)).export(run)
