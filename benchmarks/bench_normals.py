"""Surface-normal probes on base vs MVFM features: same training views, held-out evaluation.

    python benchmarks/bench_normals.py                                  # generated scene + 7-Scenes kitchen
    python benchmarks/bench_normals.py --scenes generated --probe-steps 50 --adapt-steps 10   # smoke run

Per scene, one at a time:

1. split the views (every 8th held out, as ``mvfm-train`` and ``mvfm-normals`` do);
2. adapt MV-Adapters to the scene's TRAINING views (``adapt_to_scene``, preset ``scene-adapt-cpu`` with
   ``--adapt-steps`` steps): the MVFM whose features the MVFM probe reads;
3. train one normal probe (``mvfm-normals train``, preset ``normals-cpu``) on the base model's features and
   one on the MVFM's, in each requested frame, with identical head, seed, steps and sets;
4. evaluate both on the held-out views (Probe3D metrics, the constant-normal predictor, multi-view
   disagreement).

Pretrained weights are not reachable offline: the backbone is a RANDOMLY INITIALISED full-size DINOv2
ViT-S/14 with registers (``weights=random``, seeded) at ~224 px. Absolute numbers therefore say little about
pretrained models; base vs MVFM on the same random backbone is the comparison.

Scenes: ``generated`` (``mvfm-make-scene``, 24 views at 192 x 256, exact normals) and
``sevenscenes_redkitchen`` (``../shared/data``; normals from its depth maps, 50 views).
Writes benchmarks/results/bench_normals.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCENES = ROOT.parent / "shared" / "data" / "scenes"


def scene_path(name: str, work: Path) -> Path:
    if name == "generated":
        from mvfm_nerfstudio.data.generator import SceneGeneratorConfig, make_scene

        out = work / "generated_scene"
        if not (out / "transforms.json").is_file():
            make_scene(SceneGeneratorConfig(num_views=24, height=192, width=256, supersample=1, seed=3,
                                            write_colmap=True, overwrite=True), out, progress=False)
        return out
    return SHARED_SCENES / name


def run_scene(name: str, args) -> dict:
    from mvfm_nerfstudio.data import load_scene
    from mvfm_nerfstudio.models.build import build_model
    from mvfm_nerfstudio.probes.config import load_normals_preset
    from mvfm_nerfstudio.probes.train import train_normal_probe
    from mvfm_nerfstudio.training import adapt_to_scene

    work = Path(args.work_dir) / name
    path = scene_path(name, Path(args.work_dir))
    scene = load_scene(path)
    t0 = time.perf_counter()
    ckpt = adapt_to_scene(scene, config="scene-adapt-cpu", steps=args.adapt_steps, output_dir=work / "adapt",
                          weights="random", image_size=args.image_size, eval_sets=0, num_threads=args.threads,
                          tensorboard=False, progress=not args.quiet, checkpoint_every=10_000)
    adapt_s = time.perf_counter() - t0
    base_cfg = dataclasses.replace(
        load_normals_preset("normals-cpu"), scene=path, weights="random", adapters=str(ckpt), device="cpu",
        image_size=args.image_size, steps=args.probe_steps, num_threads=args.threads, progress=not args.quiet,
        tensorboard=False, checkpoint_every=10_000,
    )
    model = build_model(base_cfg)
    runs = {}
    for frame in args.frames:
        for features in ("base", "mvfm"):
            cfg = dataclasses.replace(base_cfg, features=features, frame=frame,
                                      output_dir=work / f"probe_{features}_{frame}")
            t0 = time.perf_counter()
            _, metrics = train_normal_probe(cfg, model=model, scene=scene)
            metrics["seconds"] = time.perf_counter() - t0
            runs[f"{features}/{frame}"] = metrics
    return {"scene": name, "views": len(scene), "adapt_seconds": adapt_s, "adapt_steps": args.adapt_steps,
            "probe_steps": args.probe_steps, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", nargs="+", default=["generated", "sevenscenes_redkitchen"])
    p.add_argument("--frames", nargs="+", default=["camera", "reference"])
    p.add_argument("--adapt-steps", type=int, default=40)
    p.add_argument("--probe-steps", type=int, default=150)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="outputs/bench_normals")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/bench_normals.json)")
    args = p.parse_args()
    results = []
    for name in args.scenes:
        if name != "generated" and not (SHARED_SCENES / name).is_dir():
            print(f"skipping {name}: {SHARED_SCENES / name} not present")
            continue
        t0 = time.perf_counter()
        r = run_scene(name, args)
        r["scene_seconds"] = time.perf_counter() - t0
        results.append(r)
    columns = ["scene", "features/frame", "mean", "median", "rmse", "%<11.25", "%<22.5", "%<30", "const. mean",
               "MV disagr.", "GT disagr.", "s"]
    rows = []
    for r in results:
        for key, m in r["runs"].items():
            mv = m.get("multiview", {})
            pr = m["probe"]
            rows.append(dict(zip(columns, [
                r["scene"], key, f"{pr['mean']:.2f}", f"{pr['median']:.2f}", f"{pr['rmse']:.2f}",
                f"{pr['pct_11.25']:.1f}", f"{pr['pct_22.5']:.1f}", f"{pr['pct_30']:.1f}",
                f"{m['constant']['mean']:.2f}", f"{mv.get('mean_disagreement_deg', float('nan')):.2f}",
                f"{mv.get('gt_mean_disagreement_deg', float('nan')):.2f}", f"{m['seconds']:.0f}"])))
    print_table(rows, columns, "held-out normals (degrees, % of pixels; s = probe train + eval seconds)")
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    write_json("bench_normals", {"backbone": "dinov2_vits14_reg, RANDOM weights (offline)", "args": vars(args),
                                 "results": results}, args.output)


if __name__ == "__main__":
    main()
