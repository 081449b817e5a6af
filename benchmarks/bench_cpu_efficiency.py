"""Achieved GFLOP/s of the MVFM forward against a matmul peak measured on the same machine, in one run.

    python benchmarks/bench_cpu_efficiency.py
    python benchmarks/bench_cpu_efficiency.py --views 4 8 --size 224 --modes global knn-pool

FLOPs are counted by torch's FlopCounterMode (matmuls, convolutions, attention; 2 per
multiply-add), so the figure is "useful FLOPs / wall time": element-wise ops, copies and
gathers count as overhead, not work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mvfm import MODES, build, make_inputs  # noqa: E402
from common import count_flops, matmul_peak_gflops, print_table, time_interleaved, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="dinov2_vits14_reg")
    p.add_argument("--views", type=int, nargs="+", default=[4, 8])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", nargs="+", default=["global", "knn-pool"], choices=list(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    peaks = matmul_peak_gflops()
    peak = max(peaks.values())
    print(f"fp32 matmul peak with {a.threads} threads: {peak:.1f} GFLOP/s  ({peaks})")
    rows = []
    for mode in a.modes:
        model = build(a.backbone, mode, {})
        for s in a.views:
            images, k, c2w = make_inputs(s, a.size, model.patch_size)
            with torch.no_grad():
                calls = {"base": lambda: model.forward_base(images), "mvfm": lambda: model(images, k, c2w)}
                flops = {name: count_flops(fn) for name, fn in calls.items()}
                times = time_interleaved(calls, repeats=a.repeats)
            for name in calls:
                gflops = flops[name] / times[name] / 1e9
                rows.append({"mode": mode, "views": s, "model": name, "gflop": flops[name] / 1e9,
                             "seconds": times[name], "gflop_per_s": gflops, "pct_of_peak": 100 * gflops / peak})
    print_table(rows, ["mode", "views", "model", "gflop", "seconds", "gflop_per_s", "pct_of_peak"],
                title=f"CPU efficiency ({a.backbone}, {a.size}x{a.size}, peak {peak:.0f} GFLOP/s)")
    write_json("bench_cpu_efficiency", {"matmul_peak_gflops": peaks, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
