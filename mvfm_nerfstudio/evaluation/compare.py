"""The paper's comparison (``mvfm-eval --compare``): base model, FiT3D and MVFM on the same view sets.

Writes ``compare.json``, ``compare.md`` (the paper-style table: Loc. Err. and Base Sim. per model, pooled
over all correspondences of all scenes, then per scene) and ``compare.png`` (Loc. Err. against the angle
between the two views' central rays, one line per model, pooled over scenes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..utils.io import atomic_write
from .evaluate import EvalResult
from .metrics import bin_by_angle, summarize_matches
from .plots import _figure, _save

__all__ = ["COMPARE_LABELS", "comparison_table", "write_comparison"]

COMPARE_LABELS = {"base": "base", "fit3d": "FiT3D", "mvfm": "MVFM"}
"""Model keys of :class:`~mvfm_nerfstudio.evaluation.evaluate.EvalResult` -> table labels."""


def comparison_table(results: Dict[str, EvalResult], pck_thresholds: Sequence[float], angle_bin_deg: float,
                     labels: Dict[str, str]) -> Dict[str, object]:
    """Pooled and per-scene Loc. Err. / PCK / Base Sim. per model, and the pooled viewpoint curve (JSON-able)."""
    models = [m for m in labels if all(m in r.loc_err for r in results.values())]
    pooled: Dict[str, Dict[str, float]] = {}
    for m in models:
        loc = torch.cat([r.loc_err[m] for r in results.values()])
        pix = torch.cat([r.pixel_err[m] for r in results.values()])
        row = summarize_matches(loc, pix, pck_thresholds)
        if m == "base":
            row["base_sim"] = 1.0
        else:
            sims = torch.cat([r.base_sim_by_model.get(m, r.base_sim if m == "mvfm" else torch.empty(0))
                              for r in results.values()])
            row["base_sim"] = float(sims.mean()) if sims.numel() else math.nan
        pooled[m] = row
    angles = torch.cat([r.angle for r in results.values()])
    curve = bin_by_angle(angles, {m: torch.cat([r.loc_err[m] for r in results.values()]) for m in models},
                         angle_bin_deg)
    per_scene = {
        name: {m: {"loc_err": float(r.loc_err[m].mean()) if r.loc_err[m].numel() else math.nan,
                   "base_sim": 1.0 if m == "base" else float(r.base_sim_by_model.get(m, r.base_sim).mean())}
               for m in models}
        for name, r in results.items()
    }
    return {"models": {m: labels[m] for m in models}, "pooled": pooled, "per_scene": per_scene,
            "viewpoint_curve": curve, "angle_bin_deg": angle_bin_deg, "pck_thresholds_px": list(pck_thresholds)}


def _markdown(table: Dict[str, object], title: str) -> str:
    labels: Dict[str, str] = table["models"]  # type: ignore[assignment]
    pooled: Dict[str, Dict[str, float]] = table["pooled"]  # type: ignore[assignment]
    pck = [f"pck@{t:g}px" for t in table["pck_thresholds_px"]]  # type: ignore[union-attr]
    lines = [f"## {title}", "", "| model | Loc. Err. ↓ | Base Sim. ↑ | " + " | ".join(p.upper() for p in pck) + " | matches |",
             "|---|---|---|" + "---|" * len(pck) + "---|"]
    for m, label in labels.items():
        r = pooled[m]
        lines.append(f"| {label} | {r['loc_err']:.4f} | {r['base_sim']:.3f} | "
                     + " | ".join(f"{r[p]:.3f}" for p in pck) + f" | {r['num_matches']} |")
    lines += ["", "Per scene (Loc. Err. / Base Sim.):", "", "| scene | " + " | ".join(labels.values()) + " |",
              "|---|" + "---|" * len(labels)]
    for scene, rows in table["per_scene"].items():  # type: ignore[union-attr]
        lines.append(f"| {scene} | " + " | ".join(f"{rows[m]['loc_err']:.4f} / {rows[m]['base_sim']:.3f}"
                                                  for m in labels) + " |")
    curve: List[Dict[str, float]] = table["viewpoint_curve"]  # type: ignore[assignment]
    if curve:
        lines += ["", "Loc. Err. by angle between the views' central rays:", "",
                  "| angle (deg) | matches | " + " | ".join(labels.values()) + " |", "|---|---|" + "---|" * len(labels)]
        for row in curve:
            lines.append(f"| {row['angle_lo']:g}-{row['angle_hi']:g} | {row['count']} | "
                         + " | ".join(f"{row[m]:.4f}" for m in labels) + " |")
    return "\n".join(lines) + "\n"


def _plot(table: Dict[str, object], path: Path, title: str) -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    curve: List[Dict[str, float]] = table["viewpoint_curve"]  # type: ignore[assignment]
    x = [0.5 * (r["angle_lo"] + r["angle_hi"]) for r in curve]
    styles = {"base": "--o", "fit3d": "-.s", "mvfm": "-o"}
    for m, label in table["models"].items():  # type: ignore[union-attr]
        ax.plot(x, [r[m] for r in curve], styles.get(m, "-"), ms=3, label=label)
    ax.set_xlabel("angle between central rays (deg)")
    ax.set_ylabel("Loc. Err. (normalised L1)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def write_comparison(results: Dict[str, EvalResult], out_dir: Path, pck_thresholds: Sequence[float],
                     angle_bin_deg: float, labels: Dict[str, str], title: str, context: Dict[str, object],
                     plots: bool = True) -> Dict[str, object]:
    """Write ``compare.json``, ``compare.md`` (and ``compare.png``) to ``out_dir``; returns the JSON payload."""
    table = comparison_table(results, pck_thresholds, angle_bin_deg, labels)
    payload = {**context, **table}
    out_dir = Path(out_dir)
    atomic_write(out_dir / "compare.json", json.dumps(payload, indent=2).encode())
    atomic_write(out_dir / "compare.md", _markdown(table, title).encode())
    if plots:
        _plot(table, out_dir / "compare.png", title)
    return payload
