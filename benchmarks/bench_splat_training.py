"""``mvfm-splat`` on CPU end to end: train on a generated scene with the real trainer, then measure.

    python benchmarks/bench_splat_training.py                       # 500 iterations, 12 views of 96x128
    python benchmarks/bench_splat_training.py --iterations 2000 --threads 2

Steps: ``mvfm-make-scene``-style procedural scene (``tiny_config`` with ``--views`` views,
3/4 train, 1/4 held out; ``--init points`` converts its COLMAP points to ``sparse_pc.ply``
and sets ``ply_file_path``, as ``ns-process-data`` does, so the splats start from surface
points; ``--init random`` starts from random points), ``ns-train mvfm-splat`` in a
subprocess (random tiny backbone: features are deterministic but meaningless, so this
measures the machinery, not semantic quality), then in-process: seconds per iteration (from
the trainer's log), Gaussian count, held-out PSNR over whole images and over non-sky pixels
(object id > 0; the points do not cover the sky), and the mean cosine similarity between
rendered features (resampled to the feature grid) and the cached MVFM features on the
training views. JSON to ``benchmarks/results/bench_splat_training.json``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402


def train(scene: Path, out: Path, cache: Path, a) -> "tuple[float, str]":
    cmd = [
        str(Path(sys.executable).with_name("ns-train")), "mvfm-splat", "--machine.device-type", "cpu",
        "--vis", "tensorboard", "--viewer.websocket-host", "127.0.0.1", "--output-dir", str(out), "--timestamp", "run",
        "--max-num-iterations", str(a.iterations), "--steps-per-save", str(10 * a.iterations),
        "--steps-per-eval-image", str(10 * a.iterations), "--steps-per-eval-all-images", str(10 * a.iterations),
        "--logging.steps-per-log", "10",
        "--pipeline.datamanager.features.weights", "random", "--pipeline.datamanager.features.tiny", "True",
        "--pipeline.datamanager.features.feature-resolution", "16", "--pipeline.datamanager.features.feature-dim", "32",
        "--pipeline.datamanager.features.cache-dir", str(cache),
        "--pipeline.model.warmup-length", str(a.iterations // 5), "--pipeline.model.refine-every", "50",
        "--pipeline.model.num-downscales", "1", "--pipeline.model.resolution-schedule", str(a.iterations // 2),
        "nerfstudio-data", "--data", str(scene), "--train-split-fraction", "0.75",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return wall, proc.stdout


def add_point_cloud(scene: Path) -> None:
    """``sparse/0`` (COLMAP) -> ``sparse_pc.ply`` + ``ply_file_path`` in transforms.json, as ns-process-data does."""
    import json

    from nerfstudio.process_data.colmap_utils import create_ply_from_colmap

    meta = json.loads((scene / "transforms.json").read_text())
    applied = torch.tensor(meta["applied_transform"], dtype=torch.float32)
    create_ply_from_colmap("sparse_pc.ply", scene / "sparse" / "0", scene, applied)
    meta["ply_file_path"] = "sparse_pc.ply"
    (scene / "transforms.json").write_text(json.dumps(meta, indent=1))


@torch.no_grad()
def evaluate(config: Path) -> dict:
    from nerfstudio.utils.eval_utils import eval_setup

    from mvfm_nerfstudio.geometry.feature_grid import resize_map

    _, pipeline, _, step = eval_setup(config, test_mode="val")
    model, dm = pipeline.model, pipeline.datamanager
    from mvfm_nerfstudio.data.files import read_label_file

    psnr, psnr_fg, render_s = [], [], []
    for i in range(len(dm.eval_dataset)):
        t0 = time.perf_counter()
        out = model.get_outputs_for_camera(dm.eval_dataset.cameras[i:i + 1])
        render_s.append(time.perf_counter() - t0)
        gt = dm.cached_eval[i]["image"]
        gt = (gt.float() / 255 if gt.dtype == torch.uint8 else gt)[..., :3]
        err = ((out["rgb"] - gt) ** 2).mean(-1)
        image = Path(dm.eval_dataset.image_filenames[i])
        foreground = read_label_file(image.parent.parent / "object_ids" / image.name) > 0
        psnr.append(float(-10 * torch.log10(err.mean())))
        psnr_fg.append(float(-10 * torch.log10(err[foreground].mean())))
    cos = []
    for i in range(len(dm.train_dataset)):
        out = model.get_outputs_for_camera(dm.train_dataset.cameras[i:i + 1])
        target = dm.feature_store.feature_map(i).float()
        pred = resize_map(out["feature"], tuple(target.shape[:2]))
        cos.append(float(torch.nn.functional.cosine_similarity(pred, target, dim=-1).mean()))
    return {"step": step, "gaussians": model.num_points, "eval_psnr": sum(psnr) / len(psnr),
            "eval_psnr_non_sky": sum(psnr_fg) / len(psnr_fg),
            "train_feature_cosine": sum(cos) / len(cos), "eval_render_s": sorted(render_s)[len(render_s) // 2],
            "eval_views": len(psnr), "train_views": len(cos)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--views", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--init", choices=["points", "random"], default="points",
                    help="start from the scene's surface points (sparse_pc.ply) or from random points")
    ap.add_argument("--workdir", default=None, help="keep scene and outputs here (default: a temporary folder)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        scene = make_scene(tiny_config(seed=a.seed, num_views=a.views, write_colmap=a.init == "points",
                                       overwrite=True), work / "scene", progress=False)
        if a.init == "points":
            add_point_cloud(scene)
        wall, log = train(scene, work / "out", work / "cache", a)
        its = [float(m) for m in re.findall(r"Trainer\.train_iteration: ([0-9.]+)", log)]
        result = {"iterations": a.iterations, "train_wall_s": wall, "s_per_iteration": its[-1] if its else None,
                  **evaluate(next((work / "out").glob("*/mvfm-splat/run/config.yml")))}
    print_table([result], list(result), title="mvfm-splat on CPU")
    write_json("bench_splat_training", {"config": vars(a), "result": result}, a.json)


if __name__ == "__main__":
    main()
