"""Does restricted (knn / pooled) cross-view attention keep the multi-view consistency of global attention?

    python benchmarks/bench_restricted_consistency.py                     # the four shared scenes
    python benchmarks/bench_restricted_consistency.py --scenes llff_fern --eval-sets 16
    python benchmarks/bench_restricted_consistency.py --adapters-dir /tmp/mvfm_bench_real_scenes   # reuse adapters

Per scene, ONE set of adapters is evaluated in every attention mode (attention mode, neighbour
count and pooling are runtime options: no retraining). The adapters come from per-scene
adaptation (``adapt_to_scene`` with the ``scene-adapt-cpu`` preset on the scene's training
views), trained here unless ``--adapters-dir`` holds ``<scene>/adapters.safetensors``. Pretrained
backbone weights are unreachable offline, so the backbone is a RANDOMLY INITIALISED full-size
DINOv2 ViT-S/14 with registers (seeded; rebuilt identically from the checkpoint's metadata).

Part 1, attention modes: held-out view sets of ``--num-views`` views (default 8; each contains a
held-out view) are run in global, knn (``--neighbors`` nearest views by pose, default 3) and
knn + 2x2 key/value pooling; Loc. Err. (hard argmax, METHOD.md protocol) over all
correspondences of the sets and over pairs with a held-out view. Training sets have 4 views, where
knn with 3 neighbours IS global attention, hence 8-view sets.

Part 2, whole-scene extraction groupings (how the feature store runs a scene): features of every
view computed with each ``view_grouping`` of :func:`mvfm_nerfstudio.data.group_views`
(``--views-per-set`` views per set; views in several sets averaged, as the store does; ``+pool2``:
other views' keys/values 2x2-pooled), then
Loc. Err. of those per-view features on the same held-out sets' correspondences, with the number
of view passes each grouping costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_scenes import DEFAULT_SCENES, SHARED_SCENES  # noqa: E402
from common import print_table, write_json  # noqa: E402


def adapters_for(scene: Path, args) -> Path:
    """The scene's adapter checkpoint: reused from --adapters-dir / the work dir, else trained now."""
    from mvfm_nerfstudio.training import adapt_to_scene, load_preset

    work = Path(args.work_dir) / scene.name
    ckpt = work / "adapters.safetensors"
    if ckpt.is_file():
        return ckpt
    if args.adapters_dir:
        given = Path(args.adapters_dir) / scene.name / "adapters.safetensors"
        if given.is_file():
            work.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(given, ckpt)  # a private copy: the source may be retrained meanwhile
            return ckpt
    preset = load_preset(args.preset)
    return Path(adapt_to_scene(scene, config=preset, output_dir=work, overwrite=True, weights="random", eval_sets=0,
                               num_threads=args.threads, tensorboard=False, progress=not args.quiet,
                               checkpoint_every=10_000))


def attention_modes(neighbors: int) -> Dict[str, Dict[str, object]]:
    return {
        "global": {"attention": "global", "kv_pool": 1},
        f"knn{neighbors}": {"attention": "knn", "num_neighbors": neighbors, "kv_pool": 1},
        f"knn{neighbors}+pool2": {"attention": "knn", "num_neighbors": neighbors, "kv_pool": 2},
    }


@torch.no_grad()
def grouped_features(model, data, mode: str, views_per_set: int) -> "tuple[torch.Tensor, int]":
    """Per-view features ``[N, C, h, w]`` of the whole scene with a feature-store grouping; and view passes."""
    from mvfm_nerfstudio.data import group_views

    n = len(data.scene)
    sets = group_views(data.cam_to_world.double(), views_per_set, mode)
    total, count, passes = None, torch.zeros(n), 0
    for s in sets:
        out = model(*data.inputs(s))[0]
        if total is None:
            total = torch.zeros(n, *out.shape[1:])
        total[list(s)] += out
        count[list(s)] += 1
        passes += len(s)
    return total / count[:, None, None, None], passes


def loc_err_of_view_features(features: torch.Tensor, data, sets) -> Dict[str, float]:
    from mvfm_nerfstudio.evaluation import match_argmax

    errs, held = [], []
    heldout = torch.zeros(len(data.scene), dtype=torch.bool)
    heldout[data.heldout_views] = True
    for vs in sets:
        idx = torch.as_tensor(vs.views)
        res = match_argmax(features[idx], vs.corr, data.size)
        errs.append(res.loc_err)
        held.append(heldout[idx[vs.corr.src_view]] | heldout[idx[vs.corr.dst_view]])
    e, h = torch.cat(errs), torch.cat(held)
    return {"loc_err": float(e.mean()), "heldout_pairs": float(e[h].mean()), "matches": int(e.numel())}


def run_scene(scene: Path, args) -> "tuple[List[dict], List[dict]]":
    from mvfm_nerfstudio.evaluation.evaluate import evaluate_sets
    from mvfm_nerfstudio.evaluation.runner import EvalConfig, model_from_checkpoint
    from mvfm_nerfstudio.data import heldout_view_sets, prepare_scene

    ckpt = adapters_for(scene, args)
    model, resolved = model_from_checkpoint(EvalConfig(scenes=(scene,), adapters=ckpt))
    model.eval()
    trained_config = model.config
    data = prepare_scene(scene, int(resolved["image_size"]), model.patch_size, int(resolved["holdout_every"]))
    sets = heldout_view_sets(data, args.num_views, args.eval_sets, args.min_shared, args.seed)
    data.compute_base(model)
    mode_rows = []
    for i, (name, fields) in enumerate(attention_modes(args.neighbors).items()):
        model.config = dataclasses.replace(trained_config, **fields)
        t0 = time.perf_counter()
        res = evaluate_sets(model, data, sets, include_base=i == 0, progress=not args.quiet)
        seconds = time.perf_counter() - t0
        summary = res.summary()
        if i == 0:
            mode_rows.append({"scene": data.name, "mode": "base", "loc_err": summary["base"]["loc_err"],
                              "heldout_pairs": summary["base"]["heldout_pairs"]["loc_err"],
                              "matches": summary["base"]["num_matches"]})
        mode_rows.append({"scene": data.name, "mode": name, "loc_err": summary["mvfm"]["loc_err"],
                          "heldout_pairs": summary["mvfm"]["heldout_pairs"]["loc_err"],
                          "matches": summary["mvfm"]["num_matches"], "base_sim": summary["base_sim"],
                          "eval_s": round(seconds, 1)})
    ref = next(r for r in mode_rows if r["mode"] == "global")
    for r in mode_rows:
        r["vs_global"] = r["loc_err"] / ref["loc_err"]
    model.config = trained_config
    group_rows = [{"scene": data.name, "grouping": "base (single view)", "view_passes": len(data.scene),
                   **loc_err_of_view_features(data.base, data, sets)}]
    for spec in args.groupings:
        mode, _, pool = spec.partition("+pool")
        fields = {"kv_pool": int(pool or 1)}
        if mode == "scene":
            fields.update(attention="knn", num_neighbors=args.views_per_set - 1)
        model.config = dataclasses.replace(trained_config, **fields)
        feats, passes = grouped_features(model, data, mode, args.views_per_set)
        model.config = trained_config
        group_rows.append({"scene": data.name, "grouping": spec, "view_passes": passes,
                           **loc_err_of_view_features(feats, data, sets)})
    return mode_rows, group_rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", nargs="+", default=DEFAULT_SCENES, help="names under ../shared/data/scenes or paths")
    p.add_argument("--preset", default="scene-adapt-cpu", help="training preset when adapters are trained here")
    p.add_argument("--adapters-dir", default=None, help="reuse <dir>/<scene>/adapters.safetensors if present")
    p.add_argument("--work-dir", default="/tmp/mvfm_bench_restricted_consistency")
    p.add_argument("--num-views", type=int, default=8, help="views per held-out evaluation set")
    p.add_argument("--neighbors", type=int, default=3, help="knn: views each view attends to besides itself")
    p.add_argument("--eval-sets", type=int, default=24)
    p.add_argument("--min-shared", type=int, default=32)
    p.add_argument("--groupings", nargs="+",
                   default=["neighbors", "cover", "partition", "partition+pool2", "scene", "scene+pool2"],
                   help="feature-store view groupings, optionally with '+poolN' (other views' keys/values pooled)")
    p.add_argument("--views-per-set", type=int, default=4, help="feature-store set size of the groupings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.10, help="allowed relative Loc. Err. increase vs global")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", default=None, help="output (default benchmarks/results/bench_restricted_consistency.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mode_rows, group_rows = [], []
    for name in args.scenes:
        scene = Path(name) if Path(name).exists() else SHARED_SCENES / name
        if not scene.is_dir():
            raise SystemExit(f"scene {name!r} not found (looked for {scene})")
        m, g = run_scene(scene, args)
        mode_rows += m
        group_rows += g
        print_table(m, ["scene", "mode", "loc_err", "heldout_pairs", "vs_global", "matches"], title=scene.name)
    for r in mode_rows:
        if r["mode"] not in ("base", "global"):
            r["within_tolerance"] = r["vs_global"] <= 1 + args.tolerance
    print_table(mode_rows, ["scene", "mode", "loc_err", "heldout_pairs", "vs_global", "within_tolerance", "base_sim",
                            "matches", "eval_s"],
                title=f"attention modes, {args.num_views}-view held-out sets (same adapters; random-init backbone)")
    print_table(group_rows, ["scene", "grouping", "view_passes", "loc_err", "heldout_pairs", "matches"],
                title=f"whole-scene groupings ({args.views_per_set} views per set), same held-out correspondences")
    write_json("bench_restricted_consistency", {
        "description": "Same per-scene adapters (scene-adapt-cpu preset, RANDOMLY INITIALISED dinov2_vits14_reg: "
                       "pretrained weights unreachable offline) evaluated with global / knn / knn+pool attention on "
                       "held-out view sets, and with the feature store's whole-scene view groupings.",
        "args": {k: str(v) for k, v in vars(args).items()},
        "attention_modes": mode_rows,
        "groupings": group_rows,
    }, args.json)


if __name__ == "__main__":
    main()
