"""Converting a full-size published checkpoint: time of ``mvfm-convert`` and of loading its output.

    python benchmarks/bench_convert.py                 # ViT-S/14-reg MV-DINOv2 (the size of Leoseg/dinov2_reg)
    python benchmarks/bench_convert.py --repeats 5

A random checkpoint in the authors' exact layout (``tests/authors_reference.py``: 346 keys, LoRA r = 32 on every
``attn.qkv``, adapters 2..12 stored as one shared module) is written at full size, then converted with
``convert_published`` (``torch.load(weights_only=True)``, key mapping and checks, LoRA merge, the safetensors
written) and the result loaded back as ``create_mvfm(..., adapters=<file>)``. Times are medians over repeats
(the first run, which also imports and warms up, is reported apart). The converted model is checked against the
reference forward of the authors' math on a small input (max |diff|).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from common import write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed conversions after the first one")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/bench_convert.json)")
    args = parser.parse_args()

    import authors_reference as ref
    from conftest import orbit_cameras

    from mvfm_nerfstudio import create_mvfm
    from mvfm_nerfstudio.models.published import convert_published

    # the published MV-DINOv2's size: ViT-S/14 with registers, 12 blocks, LoRA r = alpha = 32
    ref.WIDTH, ref.DEPTH, ref.HEADS, ref.RANK, ref.ALPHA = 384, 12, 6, 32, 32
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dinov2_reg"
        t0 = time.perf_counter()
        sd = ref.write_checkpoint("dinov2_reg", folder)
        write_s = time.perf_counter() - t0
        ckpt = folder / "checkpoints" / "best.pth"
        out = Path(tmp) / "mv_dinov2.safetensors"
        convert, load = [], []
        for _ in range(1 + args.repeats):
            t0 = time.perf_counter()
            convert_published(folder, out)
            convert.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model = create_mvfm("dinov2_vits14_reg", adapters=str(out))
            load.append(time.perf_counter() - t0)
        k, c2w = orbit_cameras(1, 2, 56, 56, seed=0)
        images = torch.rand(1, 2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            feats = model(images, k, c2w)[0]
        diff = float((feats - ref.reference_forward("dinov2_reg", sd, images[0], k[0], c2w[0], scale=1.0)).abs().max())
        payload = {
            "checkpoint": {"keys": len(sd), "bytes": ckpt.stat().st_size, "write_seconds": round(write_s, 2)},
            "converted_bytes": out.stat().st_size,
            "convert_seconds_first": round(convert[0], 2),
            "convert_seconds_median": round(statistics.median(convert[1:]), 2) if args.repeats else None,
            "load_converted_seconds_median": round(statistics.median(load[1:] or load), 2),
            "convert_seconds_all": [round(t, 2) for t in convert],
            "max_abs_diff_vs_reference": diff,
            "backbone_parameters": sum(p.numel() for p in model.backbone.parameters()),
            "adapter_parameters": sum(p.numel() for p in model.trainable_parameters()),
            "budget_seconds": 30,
        }
    print(f"authors' layout ViT-S/14-reg MV-DINOv2: {payload['checkpoint']['keys']} keys, "
          f"{payload['checkpoint']['bytes'] / 2**20:.0f} MiB")
    print(f"convert: first {payload['convert_seconds_first']} s, median {payload['convert_seconds_median']} s "
          f"(budget 30 s); load converted: {payload['load_converted_seconds_median']} s; "
          f"max |diff| vs reference {diff:.2e}")
    write_json("bench_convert", payload, args.output)


if __name__ == "__main__":
    main()
