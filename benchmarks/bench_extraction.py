"""Whole-scene feature extraction (FeatureStore, every image of a shared scene): MVFM vs the base backbone alone.

    python benchmarks/bench_extraction.py                                   # dtu_scan24_monosdf, 'scene' vs base
    python benchmarks/bench_extraction.py --scene fox --groupings scene partition neighbors --repeats 1

Each run is a complete ``FeatureStore.prepare()`` into a fresh cache directory (image loading and
resizing, the MVFM or base passes, PCA to the cached dimension, writing the cache), with the
plugin's defaults (``feature_resolution`` 32, ``feature_dim`` 64) and a full-size backbone with
random weights (speed does not depend on the weights; untrained adapters cost what trained ones
do). ``base`` is the same store with ``multi_view=False`` (the plain 2D backbone per image). Runs
are interleaved (base, grouping 1, grouping 2, base, ...) and the median is reported, so machine
noise hits all alike. Peak memory is the resident-set increase during a run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_SCENES = ROOT.parent / "shared" / "data" / "scenes"


def view_source(scene_dir: Path):
    """The scene's views as a :class:`~mvfm_nerfstudio.feature_store.ViewSource` (as mvfm-segment builds it)."""
    from mvfm_nerfstudio.data import load_scene
    from mvfm_nerfstudio.feature_store import ViewSource

    scene = load_scene(scene_dir)
    return scene, ViewSource(
        image_paths=list(scene.image_paths), image_sizes=scene.image_sizes, intrinsics=scene.intrinsics,
        cam_to_world=scene.cam_to_world, load_image=lambda i: scene.load_image(i).permute(1, 2, 0),
        scene_name=scene.name, scene_root=scene.root,
    )


def extract(source, grouping: str, args, work: Path) -> Dict[str, float]:
    """One full extraction into a fresh cache dir; returns seconds, passes and peak memory."""
    from mvfm_nerfstudio.feature_store import FeatureStore, FeatureStoreConfig

    cache = work / f"cache-{grouping}"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = FeatureStoreConfig(
        backbone=args.backbone, weights="random", multi_view=grouping != "base",
        view_grouping=grouping if grouping != "base" else "neighbors", views_per_set=args.views_per_set,
        feature_resolution=args.feature_resolution, feature_dim=args.feature_dim, cache_dir=cache, device="cpu",
        adapters=args.adapters,
    )
    store = FeatureStore(cfg, source)
    store.cache_key()  # hashing the image files is not extraction work
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        store.prepare()
        seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": seconds, "passes": store.mvfm_forwards, "peak_mb": mem.peak_mb,
            "sets": len(store.meta["view_sets"]), "grid": "x".join(map(str, store.grid))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene", default="dtu_scan24_monosdf", help="name under ../shared/data/scenes, or a path")
    p.add_argument("--groupings", nargs="+", default=["scene"], choices=["scene", "partition", "cover", "neighbors"])
    p.add_argument("--backbone", default="dinov2_vits14_reg")
    p.add_argument("--adapters", default=None, help="adapter checkpoint (default: untrained adapters after every block)")
    p.add_argument("--views-per-set", type=int, default=4)
    p.add_argument("--feature-resolution", type=int, default=32)
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="output (default benchmarks/results/bench_extraction.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scene_dir = Path(args.scene) if Path(args.scene).exists() else SHARED_SCENES / args.scene
    if not scene_dir.is_dir():
        raise SystemExit(f"scene {args.scene!r} not found (looked for {scene_dir})")
    scene, source = view_source(scene_dir)
    names = ["base", *args.groupings]
    samples: Dict[str, List[Dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="mvfm_bench_extraction_") as tmp:
        extract(source, "base", args, Path(tmp))  # warm-up: imports, backbone construction, file cache
        for r in range(args.repeats):
            for name in names:
                samples[name].append(extract(source, name, args, Path(tmp)))
                print(f"repeat {r + 1}/{args.repeats} {name}: {samples[name][-1]['seconds']:.1f} s", flush=True)
    n = len(source)
    base_s = statistics.median(x["seconds"] for x in samples["base"])
    rows = []
    for name in names:
        sec = statistics.median(x["seconds"] for x in samples[name])
        last = samples[name][-1]
        rows.append({"method": name, "images": n, "grid": last["grid"], "sets": last["sets"], "passes": last["passes"],
                     "seconds": sec, "images_per_s": n / sec, "time_vs_base": sec / base_s,
                     "peak_mb": max(x["peak_mb"] for x in samples[name]),
                     "all_seconds": [round(x["seconds"], 2) for x in samples[name]]})
    cols = ["method", "images", "grid", "sets", "passes", "seconds", "images_per_s", "time_vs_base", "peak_mb"]
    print_table(rows, cols, title=f"feature extraction, {scene.name} ({args.backbone}, random weights, "
                                  f"{args.threads} threads, median of {args.repeats})")
    write_json("bench_extraction", {"scene": scene.name, "args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, args.json)


if __name__ == "__main__":
    main()
