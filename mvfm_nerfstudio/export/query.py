"""Queries for ``mvfm-export``: a feature vector ``[D]`` in the run's feature space, from a pixel or a file.

A query comes from

* a pixel of a training view (``--query-view I --query-pixel X Y``): the feature the model renders along the
  ray through that pixel's centre, exactly as the viewer's click-to-query;
* a saved query (``--query-feature FILE``, ``query_feature.safetensors`` from ``mvfm-segment`` or an earlier
  ``mvfm-export``): re-expressed in the run's feature space by
  :func:`~mvfm_nerfstudio.segmentation.query.query_in_space` (through the backbone's full channels when the
  run's PCA reduction differs).

Text queries plug in as a third source: give :class:`QueryOptions` a ``query_text`` field and add one branch to
:func:`resolve_query` that returns the text embedding in the run's feature space (see the comment there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..segmentation.query import QueryFeature, load_query, query_in_space, save_query

__all__ = ["QueryOptions", "ResolvedQuery", "resolve_query", "pixel_ray", "save_resolved_query"]


@dataclass
class QueryOptions:
    """What to segment: one query (a pixel, or a saved query feature) and a threshold."""

    query_view: Optional[int] = None
    """Index of the training view holding the query pixel (with --query-pixel); views are in the order of the
    run's training images."""
    query_pixel: Optional[Tuple[float, float]] = None
    """Query pixel X Y = column and row (0-based) in the training image of --query-view at the resolution the run
    trained on; the query is the feature rendered along the ray through the pixel centre (X + 0.5, Y + 0.5)."""
    query_feature: Optional[Path] = None
    """Instead of a pixel: a query_feature.safetensors (from mvfm-segment or mvfm-export; same backbone). It is
    re-projected when its feature space differs from the run's."""
    threshold: Optional[float] = None
    """Cosine-similarity threshold (in [-1, 1]; similarity >= threshold is in the segment). None = Otsu's threshold
    on the histogram of the candidates' similarities (all points / Gaussians, or all pixels of all views)."""


@dataclass
class ResolvedQuery:
    """A query in the run's feature space.

    Attributes:
        feature: ``[D]`` float32 on the CPU.
        description: for messages (``"view 3 (frame_00003.png) pixel (40, 20)"``, ``"file q.safetensors"``).
        metadata: strings saved with it (``source``, ``view``, ``pixel_xy``, ...).
    """

    feature: torch.Tensor
    description: str
    metadata: Dict[str, str]


def pixel_ray(cameras, view: int, xy: Tuple[float, float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Origin and unit direction ``[3]`` (model world frame) of the ray through pixel centre
    ``(X + 0.5, Y + 0.5)`` of training view ``view``; ValueError naming the valid ranges otherwise."""
    n = len(cameras)
    if not 0 <= view < n:
        raise ValueError(f"--query-view {view} is out of range: the run has {n} training views (0..{n - 1})")
    h, w = int(cameras.height[view]), int(cameras.width[view])
    x, y = (float(v) for v in xy)
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"--query-pixel {x:g} {y:g} is outside training view {view} ({w}x{h} pixels: "
                         f"X in [0, {w}), Y in [0, {h}))")
    coords = torch.tensor([[y + 0.5, x + 0.5]])  # Nerfstudio's (row, col) image coordinates
    ray = cameras[view : view + 1].generate_rays(camera_indices=0, coords=coords)
    return ray.origins.reshape(3), ray.directions.reshape(3)


def resolve_query(run, options: QueryOptions) -> ResolvedQuery:
    """The ``[D]`` query of ``options`` in the run's feature space (see the module docstring).

    Raises:
        ValueError: no query or more than one, a pixel outside its view, a query file from another backbone or
            with the wrong number of channels.
    """
    by_pixel = options.query_view is not None or options.query_pixel is not None
    by_file = options.query_feature is not None
    # A text query adds `by_text = options.query_text is not None` to this count and one branch below:
    #     feature = <text embedding in the run's feature space>(run, options.query_text)
    if by_pixel + by_file != 1:
        raise ValueError("give exactly one query: --query-view I --query-pixel X Y, or --query-feature FILE")
    model = run.model
    if by_pixel:
        if options.query_view is None or options.query_pixel is None:
            raise ValueError("a pixel query needs both --query-view and --query-pixel")
        view = int(options.query_view)
        origin, direction = pixel_ray(run.train_cameras, view, options.query_pixel)
        feature = model.feature_at_ray(origin.to(model.device), direction.to(model.device), camera_index=view)
        name = run.train_image_names[view]
        x, y = options.query_pixel
        return ResolvedQuery(feature.float().cpu(), f"view {view} ({name}) pixel ({x:g}, {y:g})",
                             {"source": "pixel", "view": str(view), "image": name,
                              "pixel_xy": json.dumps([float(x), float(y)])})
    store = run.feature_store
    loaded = load_query(options.query_feature)
    feature = query_in_space(loaded, store.path.name, store.config.backbone, store.feature_dim,
                             store.reduction_basis, str(options.query_feature))
    return ResolvedQuery(feature.float().cpu(), f"file {options.query_feature}",
                         {**loaded.metadata, "source": f"file:{options.query_feature}"})


def save_resolved_query(path: Path, run, query: ResolvedQuery) -> None:
    """Write the query as ``query_feature.safetensors`` in ``mvfm-segment``'s format (feature space, backbone,
    the full-channel feature when the run's features are PCA-reduced), so either tool can reuse it."""
    store = run.feature_store
    reduction = store.reduction_basis
    meta = {**query.metadata, "run": str(run.config_path), "backbone": store.config.backbone,
            "weights": str(store.config.weights), "feature_space": store.path.name,
            "feature_dim": str(store.feature_dim), "reduced": "1" if reduction is not None else "0"}
    full = reduction.unproject(query.feature) if reduction is not None else None
    save_query(path, QueryFeature(query.feature, full, meta))
