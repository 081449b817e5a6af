"""MVFM forward vs its base backbone: time ratio and peak memory, measured in one run.

    python benchmarks/bench_mvfm.py                       # S = 1, 2, 4, 8, 16 at 224x224, global attention
    python benchmarks/bench_mvfm.py --views 4 8 16 32 64 --sizes 224 448 --modes global knn knn-pool

Backbone weights are random (speed does not depend on their values). Times are medians of
interleaved calls (base, MVFM, base, ...) so machine noise affects both alike; peak memory
is the increase of the resident set size during one forward (sampled every 0.5 ms), each
measured in a fresh subprocess. The summary gives, per mode and size, the MVFM / base time ratio
at S = 8, the time per view at S = 32 relative to S = 4, and a straight-line fit of peak memory
against S (MB per view and the worst relative residual: small = linear).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, peak_memory_subprocess, print_table, time_interleaved, write_json  # noqa: E402

# Named attention modes: extra MVFMConfig fields.
MODES: Dict[str, Dict[str, object]] = {
    "global": {"attention": "global"},
    "knn": {"attention": "knn", "num_neighbors": 3},
    "knn-pool": {"attention": "knn", "num_neighbors": 3, "kv_pool": 2},
}


def build(backbone: str, mode: str, extra: Dict[str, object]):
    from mvfm_nerfstudio import create_mvfm

    torch.manual_seed(0)
    return create_mvfm(backbone, weights="random", **MODES[mode], **extra).eval()


def make_inputs(views: int, size: int, patch: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    threads = torch.get_num_threads()
    from conftest import orbit_cameras  # importing the test conftest sets the thread count: restore ours

    torch.set_num_threads(threads)

    size = size // patch * patch
    images = torch.rand(1, views, 3, size, size)
    k, c2w = orbit_cameras(1, views, size, size, seed=0)
    return images, k, c2w


def memory_worker(argv) -> None:
    """Child process: print the peak-RSS increase (MB) of one forward."""
    p = argparse.ArgumentParser()
    p.add_argument("--what", choices=["base", "mvfm"])
    p.add_argument("--backbone")
    p.add_argument("--mode")
    p.add_argument("--views", type=int)
    p.add_argument("--size", type=int)
    p.add_argument("--adapter-dim", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = build(a.backbone, a.mode, {"adapter_dim": a.adapter_dim} if a.adapter_dim else {})
    images, k, c2w = make_inputs(a.views, a.size, model.patch_size)
    with torch.no_grad():
        model.forward_base(images[:, :1])  # warm-up: lazy initialisations are not activation memory
        with PeakRSS() as mem:
            if a.what == "base":
                model.forward_base(images)
            else:
                model(images, k, c2w)
    print(mem.peak_mb)


def summarize(rows, modes, target_views: int = 8, small: int = 4, large: int = 32):
    """Per mode and size: ratio at ``target_views``, per-view time at ``large`` / at ``small`` views, and how
    linear peak memory is in S (slope MB/view of a least-squares line and its worst relative residual)."""
    out = []
    for mode in modes:
        for size in sorted({r["size"] for r in rows}):
            rs = {r["views"]: r for r in rows if r["mode"] == mode and r["size"] == size}
            if not rs:
                continue
            row = {"mode": mode, "size": size}
            if target_views in rs:
                row[f"ratio_S{target_views}"] = rs[target_views]["ratio"]
            if small in rs and large in rs:
                row[f"per_view_S{large}_vs_S{small}"] = rs[large]["mvfm_ms_per_view"] / rs[small]["mvfm_ms_per_view"]
            mem = [(s, r["mvfm_peak_mb"]) for s, r in sorted(rs.items()) if "mvfm_peak_mb" in r]
            if len(mem) >= 3:
                x = torch.tensor([m[0] for m in mem], dtype=torch.float64)
                y = torch.tensor([m[1] for m in mem], dtype=torch.float64)
                a = torch.stack([x, torch.ones_like(x)], 1)
                coef = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
                fit = a @ coef
                row["mem_mb_per_view"] = float(coef[0])
                row["mem_linear_max_rel_residual"] = float(((y - fit).abs() / y.abs().clamp_min(1)).max())
            out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="dinov2_vits14_reg")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sizes", type=int, nargs="+", default=[224], help="square image sizes (rounded to the patch)")
    p.add_argument("--max-views-large", type=int, default=8,
                   help="largest S for sizes above 224 (448x448 at S = 64 would take minutes per call)")
    p.add_argument("--modes", nargs="+", default=["global"], choices=list(MODES))
    p.add_argument("--adapter-dim", type=int, default=0, help="adapter width (0 = the config default, half the backbone's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurements")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/bench_mvfm.json)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    extra = {"adapter_dim": a.adapter_dim} if a.adapter_dim else {}
    rows = []
    for mode in a.modes:
        model = build(a.backbone, mode, extra)
        for size in a.sizes:
            for s in a.views:
                if size > 224 and s > a.max_views_large:
                    continue
                images, k, c2w = make_inputs(s, size, model.patch_size)
                with torch.no_grad():
                    times = time_interleaved(
                        {"base": lambda: model.forward_base(images), "mvfm": lambda: model(images, k, c2w)},
                        repeats=a.repeats,
                    )
                row = {
                    "mode": mode, "views": s, "size": images.shape[-1],
                    "base_s": times["base"], "mvfm_s": times["mvfm"], "ratio": times["mvfm"] / times["base"],
                    "mvfm_ms_per_view": 1000 * times["mvfm"] / s,
                }
                if not a.no_memory:
                    common = ["--backbone", a.backbone, "--mode", mode, "--views", str(s), "--size", str(size),
                              "--adapter-dim", str(a.adapter_dim), "--threads", str(a.threads)]
                    row["base_peak_mb"] = peak_memory_subprocess("benchmarks.bench_mvfm", ["--worker", "--what", "base", *common])
                    row["mvfm_peak_mb"] = peak_memory_subprocess("benchmarks.bench_mvfm", ["--worker", "--what", "mvfm", *common])
                rows.append(row)
                print_table([row], list(row), title=None)
    cols = ["mode", "views", "size", "base_s", "mvfm_s", "ratio", "mvfm_ms_per_view", "base_peak_mb", "mvfm_peak_mb"]
    print_table(rows, [c for c in cols if c in rows[0]], title=f"MVFM vs base ({a.backbone}, random weights, {a.threads} threads)")
    summary = summarize(rows, a.modes)
    if summary:
        print_table(summary, sorted({k for r in summary for k in r}, key=lambda k: (k not in ("mode", "size"), k)),
                    title="summary")
    write_json("bench_mvfm", {"backbone": a.backbone, "adapter_dim": a.adapter_dim or None, "rows": rows,
                              "summary": summary}, a.json)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        memory_worker(sys.argv[2:])
    else:
        main()
