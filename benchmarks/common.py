"""Shared benchmark helpers: interleaved timing, subprocess peak memory, table/JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> Dict[str, object]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per call of each function, calls interleaved so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


_SDPA_CPU_REGISTERED = False


def _register_cpu_sdpa_flops() -> None:
    """torch's FlopCounterMode knows the CUDA attention kernels, not the CPU flash kernel: add it."""
    global _SDPA_CPU_REGISTERED
    if _SDPA_CPU_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
    def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        b, h, lq, e = query_shape
        s_k, ev = key_shape[-2], value_shape[-1]
        return 2 * b * h * lq * s_k * e + 2 * b * h * lq * s_k * ev

    _SDPA_CPU_REGISTERED = True


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations (2 per multiply-add) of matmuls, convolutions and attention in ``fn``."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_gflops(sizes: Sequence[int] = (1024, 2048, 3072), repeats: int = 5) -> Dict[str, float]:
    """Best fp32 GEMM throughput over a few square sizes (GFLOP/s), with the current thread count."""
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        t = time_interleaved({"mm": lambda: a @ b}, repeats=repeats)["mm"]
        best[str(n)] = 2 * n**3 / t / 1e9
    return best


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Context manager sampling the resident set size in a thread; ``.peak_mb`` is the increase over the start.

    The process high-water mark (ru_maxrss) is useless here because imports already set it;
    the child processes also set MALLOC_MMAP_THRESHOLD_ so freed tensors return to the OS.
    """

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.peak_mb = 0.0

    def __enter__(self) -> "PeakRSS":
        import threading

        self._start = current_rss_mb()
        self._max = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, current_rss_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, current_rss_mb())
        self.peak_mb = self._max - self._start


def peak_memory_subprocess(module: str, args: Sequence[str]) -> float:
    """Run ``python -m module args`` in a fresh process; it prints the peak-RSS increase (MB) of its measured call."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1], env=env,
    )
    return float(out.stdout.strip().splitlines()[-1])


def print_table(rows: List[Dict[str, object]], columns: Sequence[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(" | ".join(c.rjust(widths[c]) for c in columns))
    print("-|-".join("-" * widths[c] for c in columns))
    for r in rows:
        print(" | ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def write_json(name: str, payload: Dict[str, object], path: "str | None" = None) -> Path:
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2))
    print(f"\nwrote {out}")
    return out
