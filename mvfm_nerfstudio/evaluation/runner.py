"""``mvfm-eval``: base vs MVFM on the same view sets of one or more scenes -> JSON + PNG plots."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple

from ..backbones.vit import create_backbone
from ..data.scene_data import build_view_sets, heldout_view_sets, prepare_scene, usable_heldout_views
from ..models.build import build_model, spec_from_checkpoint
from ..models.config import MVFMConfig
from ..models.published import source_metadata
from ..utils.io import atomic_write
from ..utils.runtime import torch_threads
from .compare import COMPARE_LABELS, write_comparison
from .evaluate import DEFAULT_PCK_THRESHOLDS, evaluate_sets
from .plots import plot_matches, plot_viewpoint_curve

__all__ = ["EvalConfig", "run_evaluation", "model_from_checkpoint"]


@dataclass
class EvalConfig:
    """Measure multi-view consistency of an MVFM against its base model on held-out view sets.

    Both models see the same sets and correspondences; Loc. Err. is the hard-argmax protocol of
    METHOD.md, PCK is at pixel thresholds of the evaluated images, Base Sim. the mean per-pixel
    cosine between MVFM and base features.
    """

    scenes: Tuple[Path, ...] = ()
    """Scene folders to evaluate (transforms.json and/or COLMAP model with tracks, or depth)."""
    adapters: Optional[Path] = None
    """MVFM adapter checkpoint (.safetensors, e.g. from mvfm-train), or a published model: Hugging Face id
    (Leoseg/dinov2_reg, ...), folder with args.yaml + checkpoints/best.pth, the .pth, or its mvfm-convert file
    (evaluated at its profile's square input size). None = untrained adapters (= base)."""
    output_dir: Path = Path("outputs/mvfm-eval")
    """Where metrics.json, viewpoint_curve.png and matches_<scene>.png go."""
    backbone: Optional[str] = None
    """Backbone; default: the checkpoint's (else the default backbone, dinov2_vits14_reg)."""
    weights: Optional[str] = None
    """Backbone weights ('pretrained', a file, 'random'); default: what the checkpoint was trained with."""
    tiny: Optional[bool] = None
    """Tiny test backbone; default: the checkpoint's."""
    model_seed: Optional[int] = None
    """Seed for random backbone weights; default: the checkpoint's (so a random backbone is rebuilt identically)."""
    image_size: Optional[int] = None
    """Long image side in pixels; default: the training resolution stored in the checkpoint, else 224."""
    holdout_every: Optional[int] = None
    """Held-out split (every k-th view); default: the checkpoint's, else 8. Must match training to be meaningful."""
    split: Literal["heldout", "all"] = "heldout"
    """'heldout': every set contains at least one held-out view; 'all': sets drawn from all views."""
    num_views: int = 4
    """Views per set (2 gives the paper's viewpoint-curve protocol)."""
    num_sets: int = 32
    """View sets per scene."""
    min_shared: int = 32
    """Each view of a set shares at least this many correspondences with another view of the set."""
    max_per_pair: Optional[int] = 256
    """Keep at most this many correspondences per ordered view pair (None = all)."""
    pck_thresholds: Tuple[float, ...] = DEFAULT_PCK_THRESHOLDS
    """PCK thresholds in pixels of the evaluated images."""
    angle_bin_deg: float = 5.0
    """Bin width of the viewpoint curve (degrees)."""
    seed: int = 0
    """Seed of the view-set sampling."""
    device: str = "auto"
    """Device: 'auto' (this process's CUDA GPU if available, else the CPU), 'cpu', 'cuda' or 'cuda:N'."""
    num_threads: int = 0
    """Torch CPU threads while evaluating (0 = leave torch's setting)."""
    plots: bool = True
    """Write the PNG figures."""
    compare: bool = False
    """The paper's comparison: also evaluate FiT3D (--fit3d-weights) on the same view sets and write
    compare.json, compare.md (Loc. Err., Base Sim., PCK per model; viewpoint table) and compare.png."""
    fit3d_weights: str = "fit3d"
    """FiT3D backbone for --compare: 'fit3d' (yuanwenyue/FiT3D's *_finetuned.pth of this backbone, from the
    Hugging Face cache or the hub) or a local weights file (.pth / .safetensors timm state dict)."""
    progress: bool = True
    """Show progress bars."""


def _training_defaults(path: Optional[Path]) -> Dict[str, Optional[int]]:
    """Image size and held-out split an ``mvfm-train`` checkpoint was trained with (None where not stored)."""
    meta = source_metadata(path) if path is not None else {}
    return {key: int(meta[key]) if key in meta else None for key in ("image_size", "holdout_every")}


def _first_given(*values):
    return next(v for v in values if v is not None)


def model_from_checkpoint(config: EvalConfig):
    """The MVFM to evaluate, rebuilt from the checkpoint's metadata unless the config overrides it.

    Returns:
        ``(model, resolved)``: the model and a dict of the resolved settings.
    """
    spec = spec_from_checkpoint(
        config.adapters, backbone=config.backbone, weights=config.weights, tiny=config.tiny,
        model_seed=config.model_seed, device=config.device,
    )
    trained = _training_defaults(config.adapters)
    resolved = {
        "backbone": spec.backbone, "weights": spec.weights, "tiny": spec.tiny, "model_seed": spec.model_seed,
        "image_size": _first_given(config.image_size, trained["image_size"], 224),
        "holdout_every": _first_given(config.holdout_every, trained["holdout_every"], 8),
    }
    mvfm = MVFMConfig()
    if config.adapters is not None:
        mvfm = MVFMConfig.from_dict(json.loads(source_metadata(config.adapters)["config"]))
    if mvfm.input_size is not None and config.image_size is None:
        resolved["image_size"] = max(mvfm.input_size)
    resolved["input_size"] = None if mvfm.input_size is None else list(mvfm.input_size)
    return build_model(spec, **mvfm.to_dict()), resolved


def run_evaluation(config: EvalConfig) -> Dict[str, object]:
    """Evaluate every scene; writes ``metrics.json`` (+ PNGs) to ``config.output_dir`` and returns the metrics."""
    if not config.scenes:
        raise ValueError("no scenes to evaluate: pass --scenes PATH ...")
    with torch_threads(config.num_threads):
        return _run(config)


def _run(config: EvalConfig) -> Dict[str, object]:
    model, resolved = model_from_checkpoint(config)
    others = {}
    if config.compare:
        # FiT3D: the same architecture with FiT3D's weights, read out as the authors do (timm's own conventions)
        fit3d = create_backbone(str(resolved["backbone"]), config.fit3d_weights, tiny=bool(resolved["tiny"]))
        fit3d = fit3d.to(next(model.parameters()).device)
        others["fit3d"] = fit3d
        resolved["fit3d_weights"] = fit3d.weights
    # a profile's square input (the published models) unless --image-size asks for the aspect-kept one
    fixed = tuple(resolved["input_size"]) if resolved.get("input_size") and config.image_size is None else None
    out_dir = Path(config.output_dir)
    results: Dict[str, Dict] = {}
    compared = {}
    curves = {}
    t0 = time.perf_counter()
    for i, scene in enumerate(config.scenes):
        data = prepare_scene(scene, int(resolved["image_size"]), model.patch_size, int(resolved["holdout_every"]),
                             size=fixed)
        views = min(config.num_views, len(data.scene))
        seed = config.seed + 7919 * i
        extra: Dict[str, object] = {}
        if config.split == "heldout":
            sets = heldout_view_sets(data, views, config.num_sets, config.min_shared, seed, config.max_per_pair)
            usable, skipped = usable_heldout_views(data, views, config.min_shared)
            extra = {"heldout_views": usable, "skipped_heldout_views": skipped}
        else:
            sets = build_view_sets(data, views, config.num_sets, config.min_shared, seed,
                                   max_per_pair=config.max_per_pair)
        res = evaluate_sets(model, data, sets, include_base=True, progress=config.progress, others=others)
        compared[data.name] = res
        summary = {**res.summary(config.pck_thresholds, config.angle_bin_deg), **extra}
        results[data.name] = summary
        curves[data.name] = summary["viewpoint_curve"]
        if config.plots and res.example is not None:
            plot_matches(res.example, out_dir / f"matches_{data.name}.png",
                         title=f"{data.name}: o truth  x base  + MVFM")
    if config.plots:
        plot_viewpoint_curve(curves, out_dir / "viewpoint_curve.png", title="Loc. Err. vs viewpoint change")
    payload = {
        "adapters": None if config.adapters is None else str(config.adapters),
        "resolved": resolved,
        "split": config.split,
        "num_views": config.num_views,
        "pck_thresholds_px": list(config.pck_thresholds),
        "scenes": results,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.json", json.dumps(payload, indent=2).encode())
    if config.compare:
        title = f"{resolved['backbone']}: base vs FiT3D vs MVFM ({config.split} sets of {config.num_views} views)"
        payload["compare"] = write_comparison(
            compared, out_dir, config.pck_thresholds, config.angle_bin_deg, COMPARE_LABELS, title,
            {"adapters": payload["adapters"], "resolved": resolved, "split": config.split,
             "num_views": config.num_views}, plots=config.plots)
    return payload
