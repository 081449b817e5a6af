"""The GPU path in one run (< 10 min on one H200): ``bash benchmarks/gpu_check.sh`` (installs carried wheels, then this).

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-dry-run   # the same steps on the CPU at tiny sizes (checks the script)

Steps (each runs even when an earlier one failed; the summary says which passed):

1. ``forward``: the MVFM forward (``dinov2_vits14_reg``, random weights, adapters after every block made
   non-identity, knn attention with 2x2-pooled keys/values as the feature store runs it; 4 views at 224x224)
   on CUDA in fp32 (TF32 off) and in bf16 autocast, against the CPU fp32 output. Passes when
   fp32: max |gpu - cpu| <= 1e-3 * max |cpu|; bf16: max |gpu - cpu| <= 0.1 * max |cpu| and the mean cosine
   similarity of the per-cell feature vectors >= 0.99. Also reported: fp32 with TF32 matmuls (PyTorch's
   cuDNN default), not judged.
2. ``pytest``: the ``cuda``-marked tests (``tests/test_rasterize.py``: the PyTorch rasteriser against gsplat's
   CUDA rasteriser; ``tests/test_gpu_path.py``: forward, feature store and training steps on CUDA). gsplat
   1.4 compiles its kernels on first use: that build starts in the background at the beginning of the run.
3. ``ns-train``: 30 iterations of ``mvfm-features`` and of ``mvfm-splat`` on CUDA on a generated scene
   (24 views, 192x144, random full-size backbone; extraction included); passes on exit code 0, a cache
   entry, and finite losses in the last log lines.
4. ``ratio``: MVFM / base backbone forward time at S = 8 views of 518x518 (37x37 patches), fp32 and bf16
   autocast, knn + pooling (the feature store's default) and global attention; median of interleaved runs,
   CUDA-synchronised.

Prints a table and writes ``gpu_check.json`` (+ the logs) to ``$OUT`` when set, else ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))


class Check:
    """Runs the steps, keeping each one's result (or its error) and the summary rows."""

    def __init__(self, out: Path):
        self.out = out
        self.results: Dict[str, object] = {}
        self.rows: List[Dict[str, object]] = []

    def step(self, name: str, fn: Callable[[], Dict[str, object]]) -> None:
        print(f"\n=== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as err:  # the other steps still run; the summary marks this one failed
            traceback.print_exc()
            res = {"passed": False, "error": f"{type(err).__name__}: {err}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        self.results[name] = res
        print(f"=== {name}: {'PASS' if res.get('passed') else 'FAIL'} ({res['seconds']} s)", flush=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def check_forward(device, dry: bool) -> Dict[str, object]:
    import torch
    from conftest import orbit_cameras, randomize_adapters

    from mvfm_nerfstudio import create_mvfm
    from mvfm_nerfstudio.utils.runtime import compute_precision

    views, side = (2, 56) if dry else (4, 224)
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=dry, attention="knn", num_neighbors=3, kv_pool=2)
    randomize_adapters(model, seed=1)
    k, c2w = orbit_cameras(1, views, side, side, seed=0)
    images = torch.rand(1, views, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(images, k, c2w).float()
        model = model.to(device)
        x, kk, cc = images.to(device), k.to(device), c2w.to(device)
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        fp32 = model(x, kk, cc).float().cpu()
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf = model(x, kk, cc).float().cpu()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        with compute_precision(device, bf16=True):  # a no-op on the CPU (dry run): never bf16 there
            half = model(x, kk, cc).float().cpu()
    scale = float(ref.abs().max())

    def rel(a):
        return float((a - ref).abs().max()) / scale

    def cos(a):  # [B, S, C, h, w]: cosine over channels per cell
        return float(torch.nn.functional.cosine_similarity(a, ref, dim=2).mean())

    res = {"shape": list(ref.shape), "fp32_rel_max_err": rel(fp32), "tf32_rel_max_err": rel(tf),
           "bf16_rel_max_err": rel(half), "bf16_mean_cosine": cos(half),
           "tolerances": "fp32 <= 1e-3 x max|cpu|; bf16 <= 0.1 x max|cpu| and mean cosine >= 0.99"}
    res["passed"] = res["fp32_rel_max_err"] <= 1e-3 and res["bf16_rel_max_err"] <= 0.1 and res["bf16_mean_cosine"] >= 0.99
    return res


def check_pytest(out: Path, gsplat_build) -> Dict[str, object]:
    build = gsplat_build.wait() if gsplat_build is not None else None
    log = out / "pytest_cuda.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs",
           "tests/test_rasterize.py", "tests/test_gpu_path.py"]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    return {"passed": rc == 0, "rc": rc, "summary": summary[-1] if summary else text[-500:],
            "gsplat_build_rc": build}


def make_scene(work: Path, dry: bool) -> Path:
    scene = work / "scene"
    if not (scene / "transforms.json").is_file():
        size = ["--num-views", "8", "--height", "48", "--width", "64"] if dry else \
            ["--num-views", "24", "--height", "144", "--width", "192"]
        subprocess.run([sys.executable, "-m", "mvfm_nerfstudio.scripts.make_scene", *size, "--supersample", "1",
                        "--no-write-colmap", "--output-dir", str(scene), "--overwrite"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    return scene


def check_ns_train(method: str, scene: Path, work: Path, out: Path, device_type: str, dry: bool) -> Dict[str, object]:
    iterations = 2 if dry else 30
    f = "--pipeline.datamanager.features."
    cmd = [sys.executable, "-m", "nerfstudio.scripts.train", method, "--data", str(scene),
           "--output-dir", str(work / "runs"), "--machine.device-type", device_type, "--vis", "tensorboard",
           "--max-num-iterations", str(iterations), "--steps-per-save", str(iterations),
           "--steps-per-eval-batch", "1000000", "--steps-per-eval-image", "1000000",
           "--steps-per-eval-all-images", "1000000", "--viewer.quit-on-train-completion", "True",
           "--logging.steps-per-log", "1", f"{f}weights", "random", f"{f}cache-dir", str(work / "cache")]
    if dry:
        cmd += [f"{f}tiny", "True", f"{f}feature-resolution", "8"]
    log = out / f"ns_train_{method}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
    seconds = time.perf_counter() - t0
    text = log.read_text()
    res = {"rc": rc, "iterations": iterations, "wall_s": round(seconds, 1),
           "cache_line": "MVFM feature cache" in text,
           "gsplat_fallback_warning": "using the PyTorch rasteriser" in text}
    ckpts = sorted((work / "runs").glob(f"*/{method}/*/nerfstudio_models/step-*.ckpt"))
    res["checkpoint"] = str(ckpts[-1]) if ckpts else None
    if ckpts:
        import torch

        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["pipeline"]
        res["checkpoint_finite"] = all(bool(torch.isfinite(t).all()) for t in state.values()
                                       if torch.is_tensor(t) and t.is_floating_point())
    res["passed"] = rc == 0 and res["cache_line"] and bool(res.get("checkpoint_finite"))
    return res


def check_ratio(device, dry: bool) -> Dict[str, object]:
    import functools
    import statistics

    import torch
    from conftest import orbit_cameras, randomize_adapters

    from mvfm_nerfstudio import create_mvfm
    from mvfm_nerfstudio.utils.runtime import compute_precision

    views, side, repeats = (2, 56, 1) if dry else (8, 518, 10)
    k, c2w = orbit_cameras(1, views, side, side, seed=0)
    x = torch.rand(1, views, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    k, c2w = k.to(device), c2w.to(device)
    rows = {}
    modes = {"knn-pool": dict(attention="knn", num_neighbors=3, kv_pool=2), "global": dict(attention="global")}
    precisions = ["fp32"] if device.type == "cpu" else ["fp32", "bf16"]
    for mode, opts in modes.items():
        model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=dry, **opts)
        randomize_adapters(model, seed=1)
        model = model.to(device).eval()
        for prec in precisions:
            fns = {"base": functools.partial(model.forward_base, x), "mvfm": functools.partial(model, x, k, c2w)}
            times: Dict[str, List[float]] = {n: [] for n in fns}
            with torch.no_grad(), compute_precision(device, bf16=prec == "bf16"):
                for name, fn in fns.items():  # warm-up (cuDNN / kernel selection)
                    for _ in range(1 if dry else 3):
                        fn()
                _sync(device)
                for _ in range(repeats):
                    for name, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        _sync(device)
                        times[name].append(time.perf_counter() - t0)
            base, mvfm = (statistics.median(times[n]) for n in ("base", "mvfm"))
            rows[f"{mode} {prec}"] = {"base_ms": 1e3 * base, "mvfm_ms": 1e3 * mvfm, "ratio": mvfm / base}
        del model
    return {"passed": all(math.isfinite(r["ratio"]) for r in rows.values()), "views": views, "size": side,
            "rows": rows}


def start_gsplat_build(out: Path):
    """gsplat compiles its CUDA kernels on first import of its backend: start that now, in a subprocess."""
    log = open(out / "gsplat_build.log", "w")
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 8))}
    return subprocess.Popen([sys.executable, "-c", "from gsplat.cuda._backend import _C; print('gsplat _C:', _C)"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-dry-run", action="store_true", help="run every step on the CPU at tiny sizes")
    p.add_argument("--out-dir", default=None, help="where the JSON and logs go (default: $OUT, else a temp dir)")
    p.add_argument("--skip", nargs="*", default=[], choices=["forward", "pytest", "ns-train", "ratio"])
    args = p.parse_args(argv)
    import torch

    dry = args.cpu_dry_run
    out = Path(args.out_dir or os.environ.get("OUT") or tempfile.mkdtemp(prefix="mvfm_gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    if not dry and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --cpu-dry-run to check the script on a CPU)")
        return 2
    device = torch.device("cpu" if dry else "cuda")
    check = Check(out)
    check.results["machine"] = {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (cpu dry run)",
        "python": sys.version.split()[0], "dry_run": dry,
    }
    print(json.dumps(check.results["machine"]))
    gsplat_build = start_gsplat_build(out) if device.type == "cuda" and "pytest" not in args.skip else None
    work = Path(tempfile.mkdtemp(prefix="mvfm_gpu_work_"))
    if "forward" not in args.skip:
        check.step("forward", lambda: check_forward(device, dry))
    if "ratio" not in args.skip:
        check.step("ratio", lambda: check_ratio(device, dry))
    if "pytest" not in args.skip:
        check.step("pytest", lambda: check_pytest(out, gsplat_build))
    if "ns-train" not in args.skip:
        try:
            scene = make_scene(work, dry)
        except Exception as err:
            scene = None
            check.results["scene"] = {"passed": False, "error": str(err)}
        for method in ("mvfm-features", "mvfm-splat"):
            if scene is not None:
                check.step(f"ns-train {method}",
                           lambda m=method: check_ns_train(m, scene, work, out, device.type, dry))
    if gsplat_build is not None and gsplat_build.poll() is None:
        gsplat_build.kill()
    shutil.rmtree(work, ignore_errors=True)
    _summary(check.results)
    (out / "gpu_check.json").write_text(json.dumps(check.results, indent=2))
    print(f"\nwrote {out / 'gpu_check.json'}")
    steps = [v for k, v in check.results.items() if k != "machine"]
    return 0 if all(v.get("passed") for v in steps) else 1


def _summary(results: Dict[str, object]) -> None:
    from common import print_table

    rows = []
    for name, r in results.items():
        if name == "machine":
            continue
        detail = r.get("error", "")
        if name == "forward" and "error" not in r:
            detail = (f"fp32 err {r['fp32_rel_max_err']:.1e}, tf32 {r['tf32_rel_max_err']:.1e}, "
                      f"bf16 err {r['bf16_rel_max_err']:.1e} cos {r['bf16_mean_cosine']:.4f}")
        elif name == "pytest" and "error" not in r:
            detail = r["summary"]
        elif name.startswith("ns-train") and "error" not in r:
            detail = f"rc {r['rc']}, {r['iterations']} it in {r['wall_s']} s" + \
                     (", gsplat fell back to torch" if r["gsplat_fallback_warning"] else "")
        elif name == "ratio" and "error" not in r:
            detail = "; ".join(f"{k} {v['ratio']:.2f} ({v['mvfm_ms']:.0f}/{v['base_ms']:.0f} ms)"
                               for k, v in r["rows"].items())
        rows.append({"step": name, "result": "PASS" if r.get("passed") else "FAIL", "s": r.get("seconds"),
                     "detail": str(detail)[:160]})
    print_table(rows, ["step", "result", "s", "detail"], title="GPU check")


if __name__ == "__main__":
    sys.exit(main())
