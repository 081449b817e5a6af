"""``mvfm-segment``: the tool itself (configuration, outputs on disk, the whole run)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.readers import load_scene
from ..feature_store import FeatureStore, FeatureStoreConfig, ViewSource
from ..text import CANONICAL_NEGATIVES, DEFAULT_RELEVANCY_THRESHOLD, TextQuery, text_tower_for
from ..utils.io import atomic_write
from .images import heatmap, overview_image, save_png
from .masks import MultiViewSegmentation, segment_views
from .query import load_query, query_in_space, save_store_query

__all__ = ["SegmentConfig", "write_outputs", "segment_scene"]


@dataclass
class SegmentConfig:
    """mvfm-segment: consistent masks of one queried thing in every view of a posed scene, from MVFM features."""

    scene: Path
    """Scene folder (Nerfstudio transforms.json and/or COLMAP model; anything mvfm_nerfstudio.data.load_scene reads)."""
    output_dir: Path = Path("outputs/segment")
    """Where masks/, similarity/, overview.png, query_feature.safetensors and segment.json go."""
    query_view: Optional[int] = None
    """Index of the view holding the query pixel (with --query-pixel)."""
    query_pixel: Optional[Tuple[float, float]] = None
    """Query pixel X Y = column and row (0-based) in the original-size (undistorted) image of --query-view; the
    feature is sampled at the pixel's centre (X + 0.5, Y + 0.5). Fractional values are allowed."""
    query_feature: Optional[Path] = None
    """Instead of a pixel: a query_feature.safetensors written by an earlier mvfm-segment run (any scene with the
    same backbone; it is re-projected if this scene's features are reduced differently)."""
    text: Optional[str] = None
    """Instead of a pixel or a feature: a text query, e.g. "red mug". Needs a backbone with a CLIP text tower
    (--features.backbone clip_vitb16) and switches the features to CLIP's text space (--features.text-space True is
    implied); the masks keep LERF's relevancy against --text-negatives >= --threshold (default 0.5: the query beats
    every negative). See docs/text_queries.md."""
    text_negatives: Tuple[str, ...] = CANONICAL_NEGATIVES
    """Canonical negative phrases of the text relevancy (LERF's)."""
    text_weights: Optional[str] = None
    """Weights of the CLIP text tower: 'pretrained', a local open_clip .safetensors/.bin file, or 'random'; None =
    the same option as --features.weights."""
    threshold: Optional[float] = None
    """Cosine-similarity threshold of the masks. None = automatic: Otsu's threshold on the histogram of all views'
    similarities pooled together (one threshold for all views). With --text: the relevancy threshold in [0, 1]
    (None = 0.5)."""
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    """MVFM features (FeatureStoreConfig): backbone, weights, adapters, views per set, view grouping, resolution,
    PCA dimension, cache dir, per-scene adaptation. Without adapters (and without --features.adapt) the MVFM equals
    its base model, so the views are run one by one (multi_view is switched off: same features, fewer passes)."""
    overview_max_views: int = 48
    """At most this many views in overview.png (evenly spaced, always including the query view)."""
    overview_thumb_width: int = 256
    """Width of each overview thumbnail in pixels."""


QUERY_FILE = "query_feature.safetensors"
"""The query feature a pixel or file query writes beside the masks (reusable with --query-feature)."""

def _output_names(paths: Sequence[Path]) -> List[str]:
    """``<stem>.png`` per image, prefixed with the view index when stems collide."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return [f"{s}.png" for s in stems]
    return [f"{i:05d}_{s}.png" for i, s in enumerate(stems)]


def _overview_views(n: int, max_views: int, query_view: Optional[int]) -> List[int]:
    if n <= max_views:
        return list(range(n))
    picked = {int(round(k * (n - 1) / (max_views - 1))) for k in range(max_views)}
    if query_view is not None and query_view not in picked:
        picked.discard(min(picked, key=lambda v: abs(v - query_view)))
        picked.add(query_view)
    return sorted(picked)


def write_outputs(
    seg: MultiViewSegmentation,
    load_image: Callable[[int], torch.Tensor],
    image_paths: Sequence[Path],
    output_dir: Path,
    query_view: Optional[int] = None,
    query_xy: Optional[Tuple[float, float]] = None,
    overview_max_views: int = 48,
    thumb_width: int = 256,
    progress: bool = True,
) -> Dict[str, object]:
    """Write masks, similarity heatmaps and overview.png (see the module docstring); return per-view stats.

    Args:
        load_image: ``i -> [3, H, W]`` in [0, 1] (only needed for the overview's views).
        query_xy: the query point in original pixel coordinates (centre convention) for the overview marker.
    """
    from rich.progress import track

    output_dir = Path(output_dir)
    names = _output_names(image_paths)
    rows = []
    it = range(len(seg))
    if progress:
        it = track(it, description="Writing masks", transient=True)
    for i in it:
        sim = seg.similarity(i)
        mask = sim >= seg.threshold
        save_png(output_dir / "masks" / names[i], (mask.numpy().astype(np.uint8) * 255))
        save_png(output_dir / "similarity" / names[i], heatmap(sim))
        rows.append({"view": i, "image": str(image_paths[i]), "mask": f"masks/{names[i]}",
                     "mask_fraction": float(mask.float().mean()), "max_similarity": float(sim.max())})
    views = _overview_views(len(seg), overview_max_views, query_view)
    labels = [Path(p).stem for p in image_paths]
    sheet = overview_image(load_image, seg.mask, views, labels, query_view, query_xy, thumb_width)
    save_png(output_dir / "overview.png", sheet)
    return {"views": rows, "overview_views": views}


def _remove_previous_outputs(output_dir: Path) -> None:
    """Delete the masks and similarity maps an earlier run listed in ``output_dir/segment.json``, and its query file
    (only those: other files stay), so a new run on fewer or other views leaves no stale outputs beside its own."""
    summary_path = output_dir / "segment.json"
    try:
        earlier = json.loads(summary_path.read_text())
        rows = [row["mask"] for row in earlier.get("views", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no earlier run here (or not ours): touch nothing
    for mask in rows:
        name = Path(mask).name
        for sub in ("masks", "similarity"):
            (output_dir / sub / name).unlink(missing_ok=True)
    (output_dir / QUERY_FILE).unlink(missing_ok=True)  # a --text run writes none: an earlier one must not stay


def segment_scene(config: SegmentConfig, progress: bool = True) -> Dict[str, object]:
    """Run ``mvfm-segment`` (see the module docstring); returns the summary also written to ``segment.json``."""
    fcfg = config.features
    by_pixel = config.query_view is not None or config.query_pixel is not None
    by_text = config.text is not None
    if int(by_pixel) + int(config.query_feature is not None) + int(by_text) != 1:
        raise ValueError("give exactly one query: --query-view I --query-pixel X Y, --query-feature FILE, or --text PHRASE")
    if by_pixel and (config.query_view is None or config.query_pixel is None):
        raise ValueError("a pixel query needs both --query-view and --query-pixel")
    tower = None
    if by_text:
        if not config.text.strip():
            raise ValueError("--text is empty: give a phrase, e.g. --text \"red mug\"")
        if config.threshold is not None and not 0.0 <= config.threshold <= 1.0:
            raise ValueError(f"with --text, --threshold is a relevancy in [0, 1] (0.5 = the query ties with a "
                             f"negative), got {config.threshold}")
        fcfg = replace(fcfg, text_space=True)
        # before any work: NoTextTowerError names the backbones that have one; weights errors come here too
        tower = text_tower_for(fcfg, config.text_weights)
    scene = load_scene(config.scene)
    n = len(scene)
    if by_pixel:
        if not 0 <= config.query_view < n:
            raise ValueError(f"--query-view {config.query_view} is out of range: the scene has {n} views (0..{n - 1})")
        h, w = scene.image_size(config.query_view)
        x, y = config.query_pixel
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"--query-pixel {x} {y} is outside view {config.query_view} "
                             f"({scene.frame_names[config.query_view]}, {w}x{h} pixels: X in [0, {w}), Y in [0, {h}))")
    if fcfg.adapters is None and not fcfg.adapt and fcfg.multi_view:
        fcfg = replace(fcfg, multi_view=False)  # untrained adapters reproduce the base model exactly
    views = ViewSource.from_scene(scene)
    store = FeatureStore(fcfg, views).prepare()
    space = store.path.name
    reduction = store.reduction_basis
    if by_text:
        return _segment_by_text(config, fcfg, scene, store, tower, progress)
    if by_pixel:
        xy = (float(config.query_pixel[0]) + 0.5, float(config.query_pixel[1]) + 0.5)
        query = store.sample(torch.tensor([config.query_view]), torch.tensor([xy], dtype=torch.float64))[0]
        source = f"view {config.query_view} ({scene.frame_names[config.query_view]}) pixel {config.query_pixel}"
        meta = {"source": "pixel", "scene": str(scene.root), "view": str(config.query_view),
                "image": scene.frame_names[config.query_view], "pixel_xy": json.dumps(list(config.query_pixel))}
    else:
        loaded = load_query(config.query_feature)
        query = query_in_space(loaded, space, fcfg.backbone, store.feature_dim, reduction, str(config.query_feature))
        source = f"file {config.query_feature}"
        meta = {**loaded.metadata, "source": f"file:{config.query_feature}"}
        xy = None
    try:
        seg = segment_views(store.feature_map, scene.image_sizes, query, config.threshold)
    except ValueError as err:
        raise ValueError(f"{err}. Features: {store.path} (query: {source})") from None
    output_dir = Path(config.output_dir)
    _remove_previous_outputs(output_dir)
    save_store_query(output_dir / QUERY_FILE, query, store, meta)
    return _write_outputs_and_summary(config, fcfg, scene, store, seg, config.query_view if by_pixel else None, xy,
                                      progress, {"query": source})


def _write_outputs_and_summary(config: SegmentConfig, fcfg: FeatureStoreConfig, scene, store: FeatureStore,
                               seg: MultiViewSegmentation, query_view: Optional[int], xy, progress: bool,
                               extra: Dict[str, object]) -> Dict[str, object]:
    """Masks, similarity maps and overview (:func:`write_outputs`) and ``segment.json``; returns the summary
    (``extra``: the query's keys)."""
    output_dir = Path(config.output_dir)
    written = write_outputs(seg, scene.load_image, scene.image_paths, output_dir, query_view, xy,
                            config.overview_max_views, config.overview_thumb_width, progress)
    summary = {
        "scene": str(scene.root), "num_views": len(scene), **extra,
        "threshold": seg.threshold, "threshold_mode": seg.threshold_mode,
        "feature_cache": str(store.path), "feature_grid": list(store.grid), "feature_dim": store.feature_dim,
        "features": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(fcfg).items()},
        **written,
    }
    atomic_write(output_dir / "segment.json", json.dumps(summary, indent=1).encode())
    return summary


def _segment_by_text(config: SegmentConfig, fcfg: FeatureStoreConfig, scene, store: FeatureStore, tower,
                     progress: bool) -> Dict[str, object]:
    """The ``--text`` branch of :func:`segment_scene`: relevancy grids of every view, one fixed threshold."""
    query = TextQuery.encode(tower, config.text, config.text_negatives)
    grids = [query.relevancy(store.feature_map(i), store.reduction_basis) for i in range(len(scene))]
    threshold = DEFAULT_RELEVANCY_THRESHOLD if config.threshold is None else float(config.threshold)
    seg = MultiViewSegmentation(grids, scene.image_sizes, threshold, "fixed" if config.threshold is not None else "lerf")
    _remove_previous_outputs(Path(config.output_dir))
    return _write_outputs_and_summary(config, fcfg, scene, store, seg, None, None, progress, {
        "query": f"text {config.text!r}", "text": config.text, "text_negatives": list(config.text_negatives),
        "text_weights": tower.weights, "score": "relevancy"})
