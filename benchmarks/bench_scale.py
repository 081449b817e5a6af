"""Scale: feature extraction and the first ``ns-train mvfm-features`` iterations on generated scenes of N views.

    python benchmarks/bench_scale.py                                  # N = 50, 200, 1000 at 224x168, tiny backbone
    python benchmarks/bench_scale.py --views 50 200 --full-backbone   # full-size dinov2_vits14_reg (random weights)
    python benchmarks/bench_scale.py --views 50 --code /tmp/old_tree  # another checkout's package (before/after)

For each N (scenes from ``mvfm-make-scene``, kept in ``--scenes-dir`` between runs):

* **extraction**: a fresh subprocess builds the training views exactly as the ``mvfm-features`` datamanager
  does (Nerfstudio's dataparser and dataset, :func:`view_source_from_dataset`) and runs
  ``FeatureStore.prepare()`` into an empty cache; it reports the wall time, the time inside the network's
  forward passes (the model's ``forward`` is wrapped, so any checkout can be measured), the process's peak
  RSS (``ru_maxrss`` of the child, imports included) and its RSS before extraction, and the entry's size;
* **ns-train**: ``python -m nerfstudio.scripts.train mvfm-features`` on the same scene and cache (a hit: the
  same views and options), the demo's CPU configuration, ``--iterations`` steps; peak RSS of the child
  (``wait4``) and its time.

Random weights (speed and memory do not depend on them). Writes ``benchmarks/results/bench_scale.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _features_flags(args) -> Dict[str, object]:
    """The feature store options of every run (CLI form and value)."""
    return {"backbone": args.backbone, "weights": "random", "tiny": not args.full_backbone,
            "feature_resolution": args.feature_resolution, "feature_dim": args.feature_dim}


def _env(code: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_child(cmd: List[str], env: Dict[str, str], log: Path) -> Dict[str, float]:
    """Run ``cmd``; returns its wall seconds, peak RSS (MB, from wait4) and exit code."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed (rc {proc.returncode}); log: {log}\n"
                         + log.read_text()[-3000:])
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


def make_scene(n: int, args) -> Path:
    scene = Path(args.scenes_dir) / f"scale_n{n}_{args.width}x{args.height}"
    if not (scene / "transforms.json").is_file():
        cmd = [sys.executable, "-m", "mvfm_nerfstudio.scripts.make_scene", "--num-views", str(n),
               "--height", str(args.height), "--width", str(args.width), "--no-write-colmap",
               "--output-dir", str(scene), "--overwrite"]
        print(f"generating {scene}", flush=True)
        subprocess.run(cmd, check=True, env=_env(Path(args.code)), cwd=ROOT, stdout=subprocess.DEVNULL)
    return scene


def _datamanager_config(scene: Path, cache: Path, flags: Dict[str, object]):
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features_config

    dm = mvfm_features_config().pipeline.datamanager
    dm.data = dm.dataparser.data = scene
    for k, v in flags.items():
        setattr(dm.features, k, v)
    dm.features.cache_dir = cache
    dm.features.device = "cpu"
    return dm


def extract_worker(scene: Path, cache: Path, flags: Dict[str, object], threads: int) -> None:
    """Child process: extraction as the ``mvfm-features`` datamanager runs it; prints one JSON line."""
    import torch
    from nerfstudio.data.datasets.base_dataset import InputDataset

    from mvfm_nerfstudio.feature_store import FeatureStore
    from mvfm_nerfstudio.models.mvfm import MultiViewFoundationModel
    from mvfm_nerfstudio.nerfstudio_plugin.datamanager import view_source_from_dataset

    torch.set_num_threads(threads)
    forward = {"seconds": 0.0}
    for name in ("forward", "forward_base"):
        original = getattr(MultiViewFoundationModel, name)

        def timed(self, *a, _original=original, **k):
            t0 = time.perf_counter()
            out = _original(self, *a, **k)
            forward["seconds"] += time.perf_counter() - t0
            return out

        setattr(MultiViewFoundationModel, name, timed)
    dm = _datamanager_config(scene, cache, flags)
    outputs = dm.dataparser.setup().get_dataparser_outputs(split="train")
    ds = InputDataset(outputs, scale_factor=dm.camera_res_scale_factor)
    source = view_source_from_dataset(ds, ds.get_image_float32, scene, {"scale_factor": ds.scale_factor})
    store = FeatureStore(dm.features, source)
    store.cache_key()  # hashing the image files is not extraction work
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    store.prepare()
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in store.path.iterdir())
    print(json.dumps({"views": len(source), "seconds": seconds, "forward_seconds": forward["seconds"],
                      "rss_before_mb": rss_before, "grid": list(store.grid), "cache_mb": size / 2**20,
                      "passes": store.mvfm_forwards, "entry": str(store.path),
                      # this checkout's own breakdown (ExtractionStats), where it has one
                      "stats": dataclasses.asdict(store.extraction) if getattr(store, "extraction", None) else None}))


def ns_train_cmd(scene: Path, cache: Path, flags: Dict[str, object], args, out: Path) -> List[str]:
    f = "--pipeline.datamanager.features."
    cmd = [sys.executable, "-m", "nerfstudio.scripts.train", "mvfm-features", "--data", str(scene),
           "--output-dir", str(out), "--machine.device-type", "cpu", "--vis", "tensorboard",
           "--max-num-iterations", str(args.iterations), "--steps-per-save", str(10**6),
           "--steps-per-eval-batch", str(10**6), "--steps-per-eval-image", str(10**6),
           "--steps-per-eval-all-images", str(10**6), "--viewer.quit-on-train-completion", "True",
           "--pipeline.datamanager.train-num-rays-per-batch", "512",
           "--pipeline.model.num-proposal-iterations", "1", "--pipeline.model.num-proposal-samples-per-ray", "48",
           "--pipeline.model.num-nerf-samples-per-ray", "16", "--pipeline.model.num-levels", "8",
           "--pipeline.model.log2-hashmap-size", "14", "--pipeline.model.max-res", "256",
           f"{f}cache-dir", str(cache)]
    for k, v in flags.items():
        name = f"{f}{k.replace('_', '-')}"
        cmd += [name, str(v)]  # Nerfstudio's CLI takes booleans as values (True / False)
    return cmd


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--views", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--height", type=int, default=168)
    p.add_argument("--width", type=int, default=224)
    p.add_argument("--backbone", default="dinov2_vits14_reg")
    p.add_argument("--full-backbone", action="store_true", help="full-size backbone (default: tiny, 2 blocks x 64)")
    p.add_argument("--feature-resolution", type=int, default=16, help="cells along the long side (16 x 14 = 224 px)")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--iterations", type=int, default=20, help="ns-train iterations per scene (0: skip ns-train)")
    p.add_argument("--repeats", type=int, default=1, help="extractions per N: fastest time, largest RSS reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scenes-dir", default="/tmp/mvfm_bench_scale")
    p.add_argument("--code", default=str(ROOT), help="checkout whose mvfm_nerfstudio is measured")
    p.add_argument("--label", default="", help="name of this run in the JSON (e.g. before / after)")
    p.add_argument("--json", default=None, help="output (default benchmarks/results/bench_scale.json)")
    p.add_argument("--worker", nargs=3, metavar=("SCENE", "CACHE", "FLAGS_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        extract_worker(Path(args.worker[0]), Path(args.worker[1]), json.loads(args.worker[2]), args.threads)
        return
    flags = _features_flags(args)
    env = _env(Path(args.code))
    work = Path(args.scenes_dir) / "runs"
    rows = []
    for n in args.views:
        scene = make_scene(n, args)
        cache = work / f"cache_n{n}"
        shutil.rmtree(cache, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        log = work / f"extract_n{n}.log"
        runs = []
        for _ in range(args.repeats):  # the fastest run is the least disturbed by other jobs on the machine
            shutil.rmtree(cache, ignore_errors=True)
            child = _run_child([sys.executable, str(Path(__file__).resolve()), "--threads", str(args.threads),
                                "--worker", str(scene), str(cache), json.dumps(flags)], env, log)
            runs.append((json.loads(log.read_text().strip().splitlines()[-1]), child))
        res = min((r for r, _ in runs), key=lambda r: r["seconds"])
        child = {"peak_rss_mb": max(c["peak_rss_mb"] for _, c in runs)}
        row = {"N": n, "train_views": res["views"], "grid": "x".join(map(str, res["grid"])),
               "passes": res["passes"], "extract_s": res["seconds"], "s_per_view": res["seconds"] / res["views"],
               "forward_s": res["forward_seconds"], "overhead": 1 - res["forward_seconds"] / res["seconds"],
               "peak_rss_mb": child["peak_rss_mb"], "rss_before_mb": res["rss_before_mb"],
               "cache_mb": res["cache_mb"], "stats": res.get("stats"), "all_extract_s": [round(r["seconds"], 2) for r, _ in runs]}
        print(f"N={n}: extraction {row['extract_s']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
        if args.iterations > 0:
            out = work / f"ns_n{n}"
            shutil.rmtree(out, ignore_errors=True)
            train = _run_child(ns_train_cmd(scene, cache, flags, args, out), env, work / f"ns_train_n{n}.log")
            text = (work / f"ns_train_n{n}.log").read_text()
            if "MVFM feature cache: hit" not in text:
                raise SystemExit(f"ns-train did not hit the cache entry of the extraction; see {work}/ns_train_n{n}.log")
            row.update({"ns_train_s": train["seconds"], "ns_train_peak_rss_mb": train["peak_rss_mb"]})
        rows.append(row)
        shutil.rmtree(cache, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["s_per_view_vs_first"] = r["s_per_view"] / base["s_per_view"]
    cols = ["N", "train_views", "grid", "extract_s", "s_per_view", "s_per_view_vs_first", "overhead", "peak_rss_mb",
            "rss_before_mb", "cache_mb", "ns_train_peak_rss_mb", "ns_train_s"]
    backbone = f"{args.backbone} {'full-size' if args.full_backbone else 'tiny'} random weights"
    print_table(rows, cols, title=f"scale ({backbone}, {args.width}x{args.height}, {args.threads} threads)")
    payload = {"label": args.label, "backbone": backbone, "args": {k: str(v) for k, v in vars(args).items()},
               "rows": rows}
    write_json("bench_scale", payload, args.json)


if __name__ == "__main__":
    main()
