"""Per-scene adaptation on the shared real scenes: base vs MVFM on held-out view sets.

    python benchmarks/bench_real_scenes.py                          # all four scenes, ~10 min each on 2 cores
    python benchmarks/bench_real_scenes.py --scenes llff_fern --steps 50

For each scene, one at a time: split the views (every 8th held out), adapt MV-Adapters on the
training views and their SfM tracks (``adapt_to_scene`` with the ``scene-adapt-cpu`` preset), then
evaluate base and MVFM on the same view sets that each contain at least one held-out view
(``mvfm-eval``: Loc. Err., PCK, Base Sim.). Pretrained weights are not reachable offline, so the
backbone is a RANDOMLY INITIALISED full-size DINOv2 ViT-S/14 with registers (``--weights random``,
seeded, rebuilt identically for evaluation) at ~224 px on the long side.

Writes benchmarks/results/bench_real_scenes.json (plus checkpoints, metrics and figures per scene
under --work-dir).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCENES = ROOT.parent / "shared" / "data" / "scenes"
DEFAULT_SCENES = ["llff_fern", "dtu_scan24_monosdf", "fox", "sevenscenes_redkitchen"]


def run_scene(scene: Path, args) -> dict:
    from mvfm_nerfstudio.evaluation.runner import EvalConfig, run_evaluation
    from mvfm_nerfstudio.training import adapt_to_scene, load_preset

    work = Path(args.work_dir) / scene.name
    overrides = dict(weights=args.weights, image_size=args.image_size, eval_sets=0, num_threads=args.threads,
                     tensorboard=False, progress=not args.quiet, checkpoint_every=10_000)
    if args.steps is not None:
        overrides["steps"] = args.steps
    preset = load_preset(args.preset)
    t0 = time.perf_counter()
    ckpt = adapt_to_scene(scene, config=preset, output_dir=work, overwrite=True, **overrides)  # a rerun retrains
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    payload = run_evaluation(EvalConfig(
        scenes=(scene,), adapters=ckpt, output_dir=work / "eval", num_views=args.num_views, num_sets=args.eval_sets,
        num_threads=args.threads, progress=not args.quiet,
    ))
    eval_s = time.perf_counter() - t0
    r = payload["scenes"][scene.name]
    row = {
        "scene": scene.name,
        "image_size": "x".join(map(str, r["image_size"])),
        "steps": args.steps if args.steps is not None else preset.steps,
        "loc_err_base": r["base"]["loc_err"],
        "loc_err_mvfm": r["mvfm"]["loc_err"],
        "ratio": r["mvfm"]["loc_err"] / r["base"]["loc_err"],
        "heldout_pairs_base": r["base"]["heldout_pairs"]["loc_err"],
        "heldout_pairs_mvfm": r["mvfm"]["heldout_pairs"]["loc_err"],
        "base_sim": r["base_sim"],
        "matches": r["mvfm"]["num_matches"],
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
    }
    for t in payload["pck_thresholds_px"]:
        row[f"pck@{t:g}_base"] = r["base"][f"pck@{t:g}px"]
        row[f"pck@{t:g}_mvfm"] = r["mvfm"][f"pck@{t:g}px"]
    row["metrics"] = r
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", nargs="+", default=DEFAULT_SCENES, help="names under ../shared/data/scenes or paths")
    p.add_argument("--preset", default="scene-adapt-cpu")
    p.add_argument("--steps", type=int, default=None, help="override the preset's steps")
    p.add_argument("--weights", default="random", help="backbone weights (pretrained ones are not reachable here)")
    p.add_argument("--image-size", type=int, default=224, help="long image side (rounded to the patch size)")
    p.add_argument("--num-views", type=int, default=4, help="views per evaluation set")
    p.add_argument("--eval-sets", type=int, default=32, help="held-out evaluation sets per scene")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--work-dir", default="/tmp/mvfm_bench_real_scenes")
    p.add_argument("--json", default=None, help="output JSON (default benchmarks/results/bench_real_scenes.json)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    scenes = []
    for name in args.scenes:
        scene = Path(name) if Path(name).exists() else SHARED_SCENES / name
        if not scene.is_dir():
            raise SystemExit(f"scene {name!r} not found (looked for {scene})")
        scenes.append(scene)
    rows = []
    for scene in scenes:  # one at a time; results are written after every scene
        rows.append(run_scene(scene, args))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "metrics"}), flush=True)
        write_json("bench_real_scenes", {
            "description": "Per-scene adaptation (scene-adapt-cpu preset) of MV-Adapters on a RANDOMLY INITIALISED "
                           "dinov2_vits14_reg backbone (pretrained weights unreachable offline); evaluation on view "
                           "sets that each contain >= 1 held-out view (every 8th view held out).",
            "args": vars(args),
            "complete": len(rows) == len(scenes),
            "rows": rows,
        }, args.json)
    cols = ["scene", "image_size", "steps", "loc_err_base", "loc_err_mvfm", "ratio", "base_sim",
            "pck@14_base", "pck@14_mvfm", "heldout_pairs_base", "heldout_pairs_mvfm", "train_s", "eval_s"]
    print_table(rows, cols, title="per-scene adaptation, held-out sets (random-init dinov2_vits14_reg)")


if __name__ == "__main__":
    main()
