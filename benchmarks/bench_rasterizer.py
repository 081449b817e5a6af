"""Gaussian rasteriser speed: fast PyTorch compositor vs dense reference vs gsplat CUDA (when present).

    python benchmarks/bench_rasterizer.py                         # 1k/10k Gaussians at 64/128/256 px
    python benchmarks/bench_rasterizer.py --gaussians 10000 --sizes 128 --channels 20 --threads 2
    python benchmarks/bench_rasterizer.py --config outputs/.../mvfm-splat/<run>/config.yml   # a trained scene

Two scenes of N Gaussians in front of a pinhole camera (58 degree field of view), rendering
``--channels`` channels (default 20 = RGB + 16 latents + depth, what ``mvfm-splat``
composites): ``surface`` (flat, mostly opaque splats on a sphere and a back wall, like a
trained scene) and ``volume`` (a random cloud of semi-transparent Gaussians: every pixel sees
~100 of them, the hard case for a CPU compositor).
For each configuration: median seconds of a forward and of forward+backward (interleaved
calls), and the largest absolute error of the render against the exact result (the fast path
without limits, itself equal to the dense reference; see ``tests/test_rasterize.py``).
The dense reference is skipped above ``--reference-max-pairs`` pixel-Gaussian pairs (its
autograd memory grows with pixels x Gaussians).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, time_interleaved, write_json  # noqa: E402

from mvfm_nerfstudio.splatting import (  # noqa: E402
    composite_reference,
    project_gaussians,
    rasterize,
)

# name -> rasterize() keyword arguments of the torch backend
FAST_CONFIGS: Dict[str, Dict[str, Optional[int]]] = {
    "fast exact": {"max_per_pixel": None, "max_per_block": None},
    "fast K_px=256 (default)": {"max_per_pixel": 256, "max_per_block": None},
    "fast K_px=64": {"max_per_pixel": 64, "max_per_block": None},
    "fast K_px=32 K_blk=256": {"max_per_pixel": 32, "max_per_block": 256},
}


def make_scene(n: int, size: int, channels: int, device: str, kind: str = "volume", seed: int = 0):
    """``volume``: a random cloud 3 units in front of the camera (every pixel sees ~100 Gaussians);
    ``surface``: flat, mostly opaque splats on a sphere and a back wall (like a trained scene:
    compositing stops after a few Gaussians)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "volume":
        means = torch.randn(n, 3, generator=g) * 0.6
        means[:, 2] += 3.0
        scales = torch.rand(n, 3, generator=g) * 0.08 + 0.02
        opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    elif kind == "surface":
        half = n // 2
        d = torch.nn.functional.normalize(torch.randn(half, 3, generator=g), dim=-1)
        sphere = d * 0.8 + torch.tensor([0.0, 0.0, 3.0])
        wall = torch.cat([(torch.rand(n - half, 2, generator=g) - 0.5) * 5.0, torch.full((n - half, 1), 4.5)], -1)
        means = torch.cat([sphere, wall])
        s = torch.rand(n, 1, generator=g) * 0.05 + 0.03
        scales = torch.cat([s, s, s / 10], -1)
        opacities = torch.rand(n, generator=g) * 0.5 + 0.5
    else:
        raise ValueError(f"unknown scene kind {kind!r}: 'volume' or 'surface'")
    params = {
        "means": means,
        "quats": torch.randn(n, 4, generator=g),
        "scales": scales,
        "opacities": opacities,
        "colors": torch.rand(n, channels, generator=g),
    }
    f = 0.9 * size
    K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]])
    params = {k: v.to(device).requires_grad_(True) for k, v in params.items()}
    return params, torch.eye(4, device=device), K.to(device)


def trained_scene(config: str, camera_index: int = 0):
    """The Gaussians of a trained ``mvfm-splat`` run (its ``config.yml``), seen from a training camera:
    ``(params, viewmat, K, width, height)``; colours = RGB (from the SH) + latents, as the model composites."""
    from pathlib import Path as _Path

    from nerfstudio.utils.eval_utils import eval_setup

    from mvfm_nerfstudio.geometry.cameras import invert_pose, opengl_to_opencv
    from mvfm_nerfstudio.splatting import sh_colors

    _, pipeline, _, _ = eval_setup(_Path(config), test_mode="val")
    model = pipeline.model
    camera = pipeline.datamanager.train_dataset.cameras[camera_index:camera_index + 1]
    viewmat = invert_pose(opengl_to_opencv(camera.camera_to_worlds[0].float()))
    K = camera.get_intrinsics_matrices()[0].float()
    g = {k: v.detach() for k, v in model.gauss_params.items()}
    sh = torch.cat([g["features_dc"][:, None], g["features_rest"]], 1)
    rgb = sh_colors(sh, g["means"], viewmat, model.config.sh_degree) if model.config.sh_degree > 0 else \
        torch.sigmoid(g["features_dc"])
    params = {"means": g["means"], "quats": g["quats"], "scales": torch.exp(g["scales"]),
              "opacities": torch.sigmoid(g["opacities"][:, 0]), "colors": torch.cat([rgb, g["latents"]], -1)}
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    return params, viewmat, K, int(camera.width), int(camera.height)


def run_case(kind: str, p: Dict[str, torch.Tensor], viewmat: torch.Tensor, K: torch.Tensor, width: int, height: int,
             repeats: int, reference_max_pairs: float) -> List[Dict[str, object]]:
    rows = []
    n = p["means"].shape[0]
    size = f"{width}x{height}"
    args = (p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmat, K, width, height)

    def fast(cfg):
        return lambda: rasterize(*args, backend="torch", **cfg)

    def reference():
        proj = project_gaussians(p["means"], p["quats"], p["scales"], p["opacities"], viewmat, K, width, height)
        return composite_reference(proj, p["colors"], width, height, pixel_chunk=1024)

    fns = {name: fast(cfg) for name, cfg in FAST_CONFIGS.items()}
    pairs = n * width * height
    if pairs <= reference_max_pairs:
        fns["dense reference"] = reference

    def backward_of(fn):
        def run():
            out = fn()
            (out[0].sum() + out[1].sum()).backward()
            for t in p.values():
                t.grad = None
        return run

    calls = {(name, "fwd"): (lambda f=f: _no_grad(f)) for name, f in fns.items()}
    calls.update({(name, "both"): backward_of(f) for name, f in fns.items()})
    t = time_interleaved(calls, repeats=repeats)  # all interleaved: machine noise hits every entry alike
    with torch.no_grad():
        exact = fns["fast exact"]()[0]
        for name, fn in fns.items():
            out = fn()
            stats = out[2] if len(out) > 2 else {}
            rows.append({
                "scene": kind, "gaussians": n, "size": size, "method": name, "forward_s": t[(name, "fwd")],
                "fwd_bwd_s": t[(name, "both")],
                "max_abs_err": float((out[0] - exact).abs().max()),
                "max_per_block_count": stats.get("max_per_block_count"),
                "max_per_pixel_count": stats.get("max_per_pixel_count"),
                "dropped": (stats.get("n_truncated_block", 0) + stats.get("n_truncated_pixel", 0)) if stats else None,
            })
    if pairs > reference_max_pairs:
        rows.append({"scene": kind, "gaussians": n, "size": size, "method": "dense reference", "forward_s": None,
                     "fwd_bwd_s": None,
                     "note": f"skipped: {pairs:.2g} pairs > --reference-max-pairs"})
    return rows


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def run_gsplat(n: int, size: int, kind: str, channels: int, repeats: int) -> List[Dict[str, object]]:
    p, viewmat, K = make_scene(n, size, channels, "cuda", kind)
    args = (p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmat, K, size, size)

    def fwd():
        with torch.no_grad():
            rasterize(*args, backend="gsplat")
        torch.cuda.synchronize()

    def both():
        r, a, _ = rasterize(*args, backend="gsplat")
        (r.sum() + a.sum()).backward()
        torch.cuda.synchronize()

    t = time_interleaved({"fwd": fwd, "both": both}, repeats=repeats)
    exact = rasterize(*args, backend="torch", max_per_pixel=None)[0]
    err = float((rasterize(*args, backend="gsplat")[0] - exact).abs().max())
    return [{"scene": kind, "gaussians": n, "size": f"{size}x{size}", "method": "gsplat CUDA", "forward_s": t["fwd"],
             "fwd_bwd_s": t["both"], "max_abs_err": err}]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussians", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="square image sizes in pixels")
    ap.add_argument("--scenes", nargs="+", default=["surface", "volume"], choices=["surface", "volume"])
    ap.add_argument("--channels", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-max-pairs", type=float, default=4.5e7)
    ap.add_argument("--config", default=None,
                    help="instead of the synthetic scenes: a trained mvfm-splat run's config.yml (first training view)")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/bench_rasterizer.json)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    if a.config:
        p, viewmat, K, width, height = trained_scene(a.config)
        rows.extend(run_case("trained", p, viewmat, K, width, height, a.repeats, a.reference_max_pairs))
    for kind in a.scenes if not a.config else []:
        for n in a.gaussians:
            for size in a.sizes:
                p, viewmat, K = make_scene(n, size, a.channels, "cpu", kind)
                rows.extend(run_case(kind, p, viewmat, K, size, size, a.repeats, a.reference_max_pairs))
                if torch.cuda.is_available():
                    rows.extend(run_gsplat(n, size, kind, a.channels, a.repeats))
                print(f"done: {kind}, {n} Gaussians at {size}x{size}", flush=True)
    print_table(rows, ["scene", "gaussians", "size", "method", "forward_s", "fwd_bwd_s", "max_abs_err", "max_per_block_count",
                       "max_per_pixel_count", "dropped"], title="Rasteriser: seconds per call (median)")
    write_json("bench_rasterizer", {"config": vars(a), "configs": FAST_CONFIGS, "rows": rows}, a.json)


if __name__ == "__main__":
    main()
