"""PNG figures of ``mvfm-eval``: Loc. Err. vs viewpoint angle, and query points with their matches."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch

from ..utils.io import atomic_path

__all__ = ["plot_viewpoint_curve", "plot_matches"]


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_viewpoint_curve(curves: Dict[str, List[Dict[str, float]]], path: Path, title: str = "") -> Path:
    """Loc. Err. (base dashed, MVFM solid) vs the angle between the views' central rays, one colour per scene.

    Args:
        curves: scene name -> rows of :func:`~mvfm_nerfstudio.evaluation.metrics.bin_by_angle`
            (with ``base`` and ``mvfm`` values).
        path: output PNG.
    """
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (scene, rows) in enumerate(curves.items()):
        if not rows:
            continue
        x = [0.5 * (r["angle_lo"] + r["angle_hi"]) for r in rows]
        c = colors[k % len(colors)]
        if "base" in rows[0]:
            ax.plot(x, [r["base"] for r in rows], "--o", color=c, ms=3, label=f"{scene} base")
        ax.plot(x, [r["mvfm"] for r in rows], "-o", color=c, ms=3, label=f"{scene} MVFM")
    ax.set_xlabel("angle between central rays (deg)")
    ax.set_ylabel("Loc. Err. (normalised L1)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_matches(example: Dict[str, object], path: Path, max_points: int = 12, title: str = "") -> Path:
    """Query points in the first view and, in every other view, their true and predicted matches.

    Circles: ground truth; ``x``: base prediction; ``+``: MVFM prediction; colour = query.

    Args:
        example: :attr:`~mvfm_nerfstudio.evaluation.evaluate.EvalResult.example` (images ``[S, 3, H, W]``,
            ``corr``, ``pred_xy`` per model).
    """
    plt = _figure()
    images: torch.Tensor = example["images"]  # type: ignore[assignment]
    corr = example["corr"]
    preds: Dict[str, torch.Tensor] = example["pred_xy"]  # type: ignore[assignment]
    s = images.shape[0]
    views = list(example.get("views") or range(s))  # type: ignore[arg-type]
    from_first = (corr.src_view == 0).nonzero().flatten()
    # choose queries (by 3D point when known) seen from view 0, spread over the target views
    keys = corr.point_ids[from_first] if corr.point_ids is not None else from_first
    uniq = torch.unique(keys)
    g = torch.Generator().manual_seed(0)
    chosen = uniq[torch.randperm(len(uniq), generator=g)[:max_points]]
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, s, figsize=(3.2 * s, 3.2 * images.shape[-2] / images.shape[-1] + 0.4))
    axes = [axes] if s == 1 else list(axes)
    for v, ax in enumerate(axes):
        ax.imshow(images[v].permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_axis_off()
        ax.set_title(f"queries: scene view {views[0]}" if v == 0 else f"scene view {views[v]}", fontsize=8)
    for ci, key in enumerate(chosen.tolist()):
        color = cmap(ci % 20)
        rows = from_first[keys == key]
        q = corr.src_xy[rows[0]]
        axes[0].plot(float(q[0]) - 0.5, float(q[1]) - 0.5, "o", color=color, ms=5, mec="white", mew=0.8)
        for r in rows.tolist():
            ax = axes[int(corr.dst_view[r])]
            gt = corr.dst_xy[r]
            ax.plot(float(gt[0]) - 0.5, float(gt[1]) - 0.5, "o", color=color, ms=5, mec="white", mew=0.8)
            for name, marker in (("base", "x"), ("mvfm", "+")):
                if name in preds:
                    p = preds[name][r]
                    ax.plot(float(p[0]) - 0.5, float(p[1]) - 0.5, marker, color=color, ms=7, mew=1.8)
    fig.suptitle(title or "o truth   x base   + MVFM", fontsize=9)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)

