"""``mvfm-features`` training rays/s vs plain nerfacto, same data and sampler settings, in one process.

    python benchmarks/bench_nerf_training.py                         # demo scene, demo CPU config, 400 steps
    python benchmarks/bench_nerf_training.py --steps 1000 --feature-samples 0 4 1 --nerf-samples 48

Every trainer is Nerfstudio's real ``Trainer`` (``config.setup(); trainer.setup()``) with the
``mvfm-demo`` CPU configuration (``nerfstudio_plugin/demo.py:build_config``: 512 rays, one
proposal network with 48 samples, ``--nerf-samples`` NeRF samples, small hash grids). ``nerfacto``
is the same trainer config with nerfacto's model and Nerfstudio's single-process
``VanillaDataManager`` (the MVFM datamanager is one, plus the feature lookup), so both see the
same rays, samplers and fields; the only differences are the feature field, the feature lookup
and the feature loss. One ``mvfm-features`` trainer runs per ``--feature-samples`` value
(``feature_samples_per_ray``; 0 = every sample).

The step is what Nerfstudio itself times as ``Train Rays / Sec`` (callbacks + forward + backward +
optimiser step). The trainers take steps in turn (the order rotates every step), so machine
noise hits all alike; rays/s = rays per batch / median step time after ``--warmup`` steps.
Quality: after training, the mean cosine between rendered and cached features at every pixel of
``--eval-views`` training views (rendered at ``--eval-scale`` of full size; the cached feature
is sampled at each rendered pixel's centre), and the mean training-batch ``feature_cosine``
over the last 50 steps. Backbone weights are random (features carry no meaning; the field must
still fit them).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402


def make_configs(scene: Path, out: Path, args) -> Dict[str, object]:
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    from mvfm_nerfstudio.nerfstudio_plugin.demo import DemoArgs, build_config

    demo = DemoArgs(weights="random", output_dir=out, iterations=args.steps, rays_per_batch=args.rays,
                    feature_resolution=args.feature_resolution, feature_dim=args.feature_dim, device="cpu")
    configs: Dict[str, object] = {}
    for k in args.feature_samples:
        cfg = build_config(demo, scene)
        cfg.experiment_name, cfg.timestamp = "bench", f"features-k{k}"
        cfg.steps_per_eval_batch = cfg.steps_per_eval_image = cfg.steps_per_eval_all_images = 10**9
        cfg.steps_per_save = 10**9
        cfg.vis = "tensorboard"
        cfg.pipeline.model.num_nerf_samples_per_ray = args.nerf_samples
        cfg.pipeline.model.feature_samples_per_ray = k
        configs[f"mvfm-features k={k}" if k else "mvfm-features (all samples)"] = cfg
    ref = next(iter(configs.values()))
    nerf = copy.deepcopy(ref)
    nerf.method_name, nerf.timestamp = "nerfacto", "nerfacto"
    skip = ("_target",)
    dm = ref.pipeline.datamanager
    nerf.pipeline.datamanager = VanillaDataManagerConfig(
        **{f.name: getattr(dm, f.name) for f in dataclasses.fields(VanillaDataManagerConfig) if f.name not in skip})
    m = ref.pipeline.model
    nerf.pipeline.model = NerfactoModelConfig(
        **{f.name: getattr(m, f.name) for f in dataclasses.fields(NerfactoModelConfig) if f.name not in skip})
    nerf.optimizers = {k: v for k, v in ref.optimizers.items() if k != "feature_field"}
    return {"nerfacto": nerf, **configs}


def make_trainer(config, seed: int):
    import random

    import numpy as np

    from mvfm_nerfstudio.nerfstudio_plugin.feature_head import deferred_lpips

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    trainer = config.setup(local_rank=0, world_size=1)
    with deferred_lpips(False):  # nerfacto builds LPIPS, which downloads AlexNet: not here
        trainer.setup()
    return trainer


def train_step(trainer, step: int) -> Dict[str, float]:
    """One step exactly as Nerfstudio's Trainer.train times it for 'Train Rays / Sec'."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    t0 = time.perf_counter()
    trainer.pipeline.train()
    for cb in trainer.callbacks:
        cb.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    _, _, metrics = trainer.train_iteration(step)
    for cb in trainer.callbacks:
        cb.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    out = {"seconds": time.perf_counter() - t0}
    if "feature_cosine" in metrics:
        out["feature_cosine"] = float(metrics["feature_cosine"])
    return out


@torch.no_grad()
def rendered_feature_cosine(trainer, views: int, scale: float) -> float:
    """Mean cosine between rendered and cached features over every rendered pixel of ``views`` training views."""
    import torch.nn.functional as F

    pipeline = trainer.pipeline
    pipeline.eval()
    dm, model = pipeline.datamanager, pipeline.model
    cameras = dm.train_dataset.cameras
    n = len(cameras)
    sims = []
    for i in torch.linspace(0, n - 1, views).round().long().tolist():
        cam = copy.deepcopy(cameras[i : i + 1])
        full_h, full_w = int(cam.height), int(cam.width)
        cam.rescale_output_resolution(scale)
        feat = model.get_outputs_for_camera(cam.to(model.device))["feature"]  # [h, w, D]
        h, w, d = feat.shape
        v, u = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        xy = torch.stack([u * full_w / w, v * full_h / h], dim=-1).reshape(-1, 2).double()
        target = dm.feature_store.sample(torch.full((h * w,), i), xy)
        sims.append(F.cosine_similarity(feat.reshape(-1, d).cpu(), target, dim=-1).mean())
    pipeline.train()
    return float(torch.stack(sims).mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", default=None, help="Nerfstudio scene folder (default: the generated mvfm-demo scene)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--rays", type=int, default=512, help="training rays per batch")
    p.add_argument("--nerf-samples", type=int, default=16, help="nerfacto's num_nerf_samples_per_ray (demo: 16)")
    p.add_argument("--feature-samples", type=int, nargs="+", default=[0, 4],
                   help="feature_samples_per_ray of each mvfm-features trainer (0 = all samples)")
    p.add_argument("--feature-resolution", type=int, default=24)
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--eval-views", type=int, default=4)
    p.add_argument("--eval-scale", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's CPU default is 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", default=None, help="output (default benchmarks/results/bench_nerf_training.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="mvfm_bench_nerf_") as tmp:
        out = Path(tmp)
        if args.scene is None:
            from mvfm_nerfstudio.data.generator import SceneGeneratorConfig, make_scene

            scene = make_scene(SceneGeneratorConfig(num_views=24, height=144, width=192, supersample=1),
                               out / "scene", progress=False)  # the mvfm-demo scene
        else:
            scene = Path(args.scene)
        configs = make_configs(scene, out, args)
        trainers = {name: make_trainer(cfg, args.seed) for name, cfg in configs.items()}
        names = list(trainers)
        log: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
        t_start = time.perf_counter()
        for step in range(args.steps):
            order = names[step % len(names):] + names[: step % len(names)]
            for name in order:
                log[name].append(train_step(trainers[name], step))
            if (step + 1) % 50 == 0:
                med = {n: statistics.median(x["seconds"] for x in log[n][-50:]) for n in names}
                print(f"step {step + 1}/{args.steps} ({time.perf_counter() - t_start:.0f} s): "
                      + ", ".join(f"{n} {1000 * s:.0f} ms" for n, s in med.items()), flush=True)
        rays = configs["nerfacto"].pipeline.datamanager.train_num_rays_per_batch
        base_s = statistics.median(x["seconds"] for x in log["nerfacto"][args.warmup:])
        rows = []
        for name in names:
            sec = statistics.median(x["seconds"] for x in log[name][args.warmup:])
            row = {"method": name, "step_ms": 1000 * sec, "rays_per_s": rays / sec, "vs_nerfacto": base_s / sec}
            if name != "nerfacto":
                row["train_feature_cosine"] = statistics.mean(x["feature_cosine"] for x in log[name][-50:])
                row["render_feature_cosine"] = rendered_feature_cosine(trainers[name], args.eval_views, args.eval_scale)
            rows.append(row)
    cols = ["method", "step_ms", "rays_per_s", "vs_nerfacto", "train_feature_cosine", "render_feature_cosine"]
    print_table(rows, cols, title=f"training speed, {args.steps} steps (median after {args.warmup}), {rays} rays/step, "
                                  f"{args.nerf_samples} NeRF samples/ray, {args.threads} thread(s)")
    write_json("bench_nerf_training", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
