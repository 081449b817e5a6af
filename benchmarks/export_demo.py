"""The picture in docs/export.md: an object cut out of an ``mvfm-splat`` run with ``mvfm-export segment``.

    python benchmarks/export_demo.py --output-dir /tmp/export_demo            # ~2 min on 2 idle CPU cores
    python benchmarks/export_demo.py --output-dir /tmp/export_demo --iterations 300

No pretrained weights are reachable here and random backbone features do not separate objects, so this demo
trains on **oracle features**: after the feature cache entry of the run is computed (random tiny backbone), its
feature maps are replaced by each cell's histogram of the generated scene's object ids (what a perfect
backbone could give). Everything after that is the real pipeline: ``mvfm-splat`` trains on the cache
(Nerfstudio's Trainer, CPU), ``mvfm-export segment`` is given a pixel of one object, and the exported 3DGS
``.ply`` is read back with plyfile and rendered with the package's PyTorch rasteriser (``splatting.rasterize``,
its SH colours, opacities, scales and rotations as in the file) from two training cameras.

Prints the export timings and how many of the segmented Gaussians project onto the queried object in the query
view (a rough precision: occlusion is ignored).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mvfm_nerfstudio.data.generator import make_scene, tiny_config  # noqa: E402
from mvfm_nerfstudio.data.readers import load_scene  # noqa: E402
from mvfm_nerfstudio.features import fit_pca  # noqa: E402


def _seed_points(scene: Path) -> None:
    """Write the scene's COLMAP points as ``points3D.ply`` and name it in transforms.json (splatfacto's seeding)."""
    import pycolmap

    from mvfm_nerfstudio.export.ply import write_point_ply

    rec = pycolmap.Reconstruction(str(scene / "sparse" / "0"))
    xyz = torch.tensor(np.array([p.xyz for p in rec.points3D.values()]), dtype=torch.float32)
    rgb = torch.tensor(np.array([p.color for p in rec.points3D.values()]), dtype=torch.float32) / 255
    write_point_ply(scene / "points3D.ply", xyz, rgb)
    meta = json.loads((scene / "transforms.json").read_text())
    meta["ply_file_path"] = "points3D.ply"
    (scene / "transforms.json").write_text(json.dumps(meta, indent=1))


def _oracle_cache(entry: Path, scene: Path) -> np.ndarray:
    """Replace the entry's features with per-cell object-id histograms (same grid and channel count) and re-seal
    it (display basis, sizes and checksum in ``meta.json``), so the run loads it instead of recomputing it as
    corrupt. Returns the oracle features ``[N, h, w, d]`` (float16)."""
    from mvfm_nerfstudio.feature_store.cache import read_entry, write_bases, write_meta

    n, h, w, d = np.load(entry / "features.npy", mmap_mode="r").shape
    sealed = read_entry(entry, n, (h, w))
    meta, reduction = sealed.meta, sealed.reduction_basis
    del sealed  # its memory map of features.npy, which is rewritten next
    ids = load_scene(scene).load_object_ids(range(n))
    onehot = F.one_hot(ids, d).permute(0, 3, 1, 2).float()
    oracle = F.adaptive_avg_pool2d(onehot, (h, w)).permute(0, 2, 3, 1)  # [N, h, w, d]
    stored = oracle.numpy().astype(np.float16)
    np.save(entry / "features.npy", stored)
    write_bases(entry, fit_pca(oracle.reshape(-1, d), 3), reduction)
    write_meta(entry, meta)
    return stored


def _config(scene: Path, out: Path, iterations: int):
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat_config

    config = mvfm_splat_config()
    config.experiment_name, config.output_dir, config.timestamp = "export_demo", out / "runs", "run"
    config.max_num_iterations = iterations
    config.steps_per_save = iterations
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    config.vis = "tensorboard"
    dm = config.pipeline.datamanager
    dm.data = dm.dataparser.data = scene
    f = dm.features
    f.weights, f.tiny, f.feature_resolution, f.feature_dim, f.cache_dir = "random", True, 16, 8, out / "cache"
    config.pipeline.model.sh_degree = 1
    return config


def _render_ply(path: Path, camera) -> np.ndarray:
    """Render a standard 3DGS ``.ply`` (as written by ``mvfm-export segment``) from a Nerfstudio camera with the
    package's PyTorch rasteriser, on white: ``[H, W, 3]`` in [0, 1]."""
    from plyfile import PlyData

    from mvfm_nerfstudio.geometry.cameras import invert_pose, opengl_to_opencv
    from mvfm_nerfstudio.splatting import rasterize, sh_colors

    v = PlyData.read(str(path))["vertex"]
    names = [p.name for p in v.properties]

    def cols(prefix: str) -> torch.Tensor:
        keys = sorted((n for n in names if n.startswith(prefix)), key=lambda n: int(n.rsplit("_", 1)[1]))
        return torch.tensor(np.stack([v[k] for k in keys], -1), dtype=torch.float32)

    means = torch.tensor(np.stack([v["x"], v["y"], v["z"]], -1), dtype=torch.float32)
    n = len(means)
    rest = cols("f_rest_").reshape(n, 3, -1).transpose(1, 2)  # the file is channel-major
    sh = torch.cat([cols("f_dc_")[:, None], rest], dim=1)  # [N, K, 3]
    degree = int(round(sh.shape[1] ** 0.5)) - 1
    c2w = torch.cat([camera.camera_to_worlds[0], torch.tensor([[0.0, 0, 0, 1]])])
    viewmat = invert_pose(opengl_to_opencv(c2w))
    K = camera.get_intrinsics_matrices()[0]
    rgb = sh_colors(sh, means, viewmat, degree)
    opacity = torch.sigmoid(torch.tensor(np.asarray(v["opacity"]), dtype=torch.float32))
    with torch.no_grad():
        render, _, _ = rasterize(means, cols("rot_"), torch.exp(cols("scale_")), opacity, rgb, viewmat, K,
                                 int(camera.width[0]), int(camera.height[0]), background=torch.ones(3),
                                 max_per_pixel=None, backend="torch")
    return render.clamp(0, 1).numpy()


def _draw(run, scene: Path, full_ply: Path, seg_ply: Path, xy, other_view: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = load_scene(scene).load_image(0).permute(1, 2, 0).numpy()
    cams = run.train_cameras
    panels = [(image, "training view 0 + query pixel"), (_render_ply(full_ply, cams[0:1]), "all Gaussians, view 0"),
              (_render_ply(seg_ply, cams[0:1]), "segment.ply, view 0"),
              (_render_ply(seg_ply, cams[other_view : other_view + 1]), f"segment.ply, view {other_view}")]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.0), dpi=110)
    for ax, (img, name) in zip(axes, panels):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    axes[0].plot([xy[0]], [xy[1]], marker="+", color="magenta", markersize=12, mew=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output-dir", type=Path, default=Path("/tmp/export_demo"))
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--image", type=Path,
                    default=Path(__file__).resolve().parents[1] / "docs" / "images" / "export_segment.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = args.output_dir
    scene = out / "scene"
    if not (scene / "transforms.json").is_file():
        make_scene(tiny_config(seed=0, num_views=16), scene, progress=False)
        _seed_points(scene)
    config = _config(scene, out, args.iterations)
    # 1. the feature cache entry the run will use, then oracle features in it
    dm = config.pipeline.datamanager.setup(device="cpu")
    entry = dm.feature_store.path
    oracle = _oracle_cache(entry, scene)
    del dm
    # 2. train
    t = time.perf_counter()
    config.save_config()
    from nerfstudio.scripts.train import train_loop

    train_loop(local_rank=0, world_size=1, config=config)  # ns-train's own loop: seeded, so reruns agree
    print(f"trained {args.iterations} iterations in {time.perf_counter() - t:.0f} s")
    if not np.array_equal(np.load(entry / "features.npy"), oracle):  # e.g. the entry was recomputed as corrupt
        raise SystemExit(f"export_demo: the run did not train on the oracle features in {entry}")
    # 3. export: a pixel in the middle of the largest object of view 0
    from mvfm_nerfstudio.export import ExportSegment, load_run

    cfg = config.get_base_dir() / "config.yml"
    t = time.perf_counter()
    run = load_run(cfg, device="cpu")
    t_load = time.perf_counter() - t
    ids = load_scene(scene).load_object_ids([0])[0]
    obj = int(torch.bincount(ids.flatten())[2:].argmax()) + 2  # 0 = sky, 1 = ground
    ys, xs = torch.nonzero(F.max_pool2d(-(ids != obj).float()[None], 9, 1, 4)[0] == 0, as_tuple=True)  # interior
    x, y = float(xs[len(xs) // 2]), float(ys[len(ys) // 2])
    t = time.perf_counter()
    seg = ExportSegment(load_config=cfg, output_dir=out / "segment", query_view=0, query_pixel=(x, y),
                        threshold=0.9).export(run)
    t_seg = time.perf_counter() - t
    ExportSegment(load_config=cfg, output_dir=out / "all", query_view=0, query_pixel=(x, y), threshold=-1.0).export(run)
    # rough precision: segmented centres that project onto the object in view 0 (in frame, occlusion ignored)
    from mvfm_nerfstudio.geometry.cameras import invert_pose, opengl_to_opencv
    from plyfile import PlyData

    v = PlyData.read(str(out / "segment" / "segment.ply"))["vertex"]
    xyz = torch.tensor(np.stack([v["x"], v["y"], v["z"]], -1), dtype=torch.float32)
    cam = run.train_cameras[0:1]
    w2c = invert_pose(opengl_to_opencv(torch.cat([cam.camera_to_worlds[0], torch.tensor([[0.0, 0, 0, 1]])])))
    pc = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    K = cam.get_intrinsics_matrices()[0]
    uv = (pc @ K.T)[:, :2] / pc[:, 2:3]
    inside = (pc[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < ids.shape[1]) & (uv[:, 1] >= 0) & (uv[:, 1] < ids.shape[0])
    hit = ids[uv[inside, 1].long(), uv[inside, 0].long()] == obj
    precision = float(hit.float().mean()) if len(hit) else float("nan")
    print(json.dumps({"object_id": obj, "query_pixel": [x, y], "gaussians": seg["gaussians"],
                      "of_gaussians": seg["of_gaussians"], "threshold": seg["threshold"],
                      "load_run_s": round(t_load, 2),
                      "segment_export_s": round(t_seg, 2), "in_frame": int(inside.sum()),
                      "precision_in_query_view": round(precision, 3)}, indent=1))
    title = (f"mvfm-splat, {args.iterations} CPU iterations on ORACLE features (object-id histograms, not a backbone); "
             f"query: pixel ({x:.0f}, {y:.0f}) of view 0, threshold 0.9")
    _draw(run, scene, out / "all" / "segment.ply", out / "segment" / "segment.ply", (x, y), len(run.train_cameras) // 2,
          args.image, title)
    print(f"wrote {args.image}")


if __name__ == "__main__":
    main()
