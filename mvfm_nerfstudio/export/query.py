"""Queries for ``mvfm-export``: a feature vector ``[D]`` in the run's feature space, from a pixel or a file.

A query comes from

* a pixel of a training view (``--query-view I --query-pixel X Y``): the feature the model renders along the
  ray through that pixel's centre, exactly as the viewer's click-to-query;
* a saved query (``--query-feature FILE``, ``query_feature.safetensors`` from ``mvfm-segment`` or an earlier
  ``mvfm-export``): re-expressed in the run's feature space by
  :func:`~mvfm_nerfstudio.segmentation.query.query_in_space` (through the backbone's full channels when the
  run's PCA reduction differs).

* a phrase (``--query-text "red mug"``): scored by LERF's relevancy against canonical negatives
  (:class:`~mvfm_nerfstudio.text.TextQuery`), for runs whose features live in CLIP's text space
  (``clip_vitb16`` with ``--pipeline.datamanager.features.text-space True``). Its score is relevancy in (0, 1)
  (default threshold 0.5: the phrase beats every negative), not cosine similarity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ..features import PCABasis, cosine_similarity
from ..segmentation.query import load_query, query_in_space, save_store_query
from ..text import DEFAULT_RELEVANCY_THRESHOLD, TextQuery, text_tower_for

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
    query_text: Optional[str] = None
    """Instead of a pixel or file: a phrase, scored by LERF relevancy against canonical negatives. Needs a run
    whose features are in CLIP's text space (clip_vitb16 trained with
    --pipeline.datamanager.features.text-space True)."""
    text_weights: Optional[str] = None
    """Weights of the text tower for --query-text ("pretrained", a file, or "random"); None = the run's backbone
    weights option."""
    threshold: Optional[float] = None
    """Score threshold (score >= threshold is in the segment): cosine similarity in [-1, 1] for pixel and file
    queries, relevancy in [0, 1] for --query-text. None = Otsu's threshold on the histogram of the candidates'
    similarities (all points / Gaussians, or all pixels of all views); 0.5 for --query-text."""

    def has_query(self) -> bool:
        """Whether any query option is set (``views`` exports run without one)."""
        return any(v is not None for v in (self.query_view, self.query_pixel, self.query_feature, self.query_text))


@dataclass
class ResolvedQuery:
    """A query in the run's feature space.

    Attributes:
        feature: ``[D]`` float32 on the CPU (for a text query: the phrase's embedding in the run's feature space).
        description: for messages (``"view 3 (frame_00003.png) pixel (40, 20)"``, ``"file q.safetensors"``).
        metadata: strings saved with it (``source``, ``view``, ``pixel_xy``, ...).
        text: the encoded phrase and negatives of a text query (then :meth:`score` is LERF relevancy), else None.
        reduction: the run's PCA basis (text queries score reduced features through it), or None.
        full: the exact full-channel feature when known (a text query's embedding), saved with the query.
    """

    feature: torch.Tensor
    description: str
    metadata: Dict[str, str]
    text: Optional[TextQuery] = None
    reduction: Optional[PCABasis] = None
    full: Optional[torch.Tensor] = None

    @property
    def score_name(self) -> str:
        return "relevancy" if self.text is not None else "similarity"

    @property
    def score_range(self) -> Tuple[float, float]:
        """Range of :meth:`score`: (0, 1) for relevancy, (-1, 1) for cosine similarity."""
        return (0.0, 1.0) if self.text is not None else (-1.0, 1.0)

    @property
    def default_threshold(self) -> Optional[float]:
        """The threshold used when none is given: 0.5 for relevancy, None (= Otsu) for similarity."""
        return DEFAULT_RELEVANCY_THRESHOLD if self.text is not None else None

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [...]``: cosine similarity with :attr:`feature`, or LERF relevancy for a text query."""
        if self.text is not None:
            return self.text.relevancy(features, self.reduction)
        return cosine_similarity(features, self.feature)[..., 0]


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
    by_text = options.query_text is not None
    if by_pixel + by_file + by_text != 1:
        raise ValueError("give exactly one query: --query-view I --query-pixel X Y, --query-feature FILE, or "
                         "--query-text PHRASE")
    model = run.model
    if by_text:
        return _text_query(run, options)
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


def _text_query(run, options: QueryOptions) -> ResolvedQuery:
    """The phrase's :class:`TextQuery` (tower matching the run's backbone; NoTextTowerError / ValueError when the
    run's features are not in a text space) and its embedding in the run's feature space."""
    text = str(options.query_text).strip()
    if not text:
        raise ValueError("--query-text is empty: give a phrase, e.g. --query-text \"red mug\"")
    store = run.feature_store
    query = TextQuery.encode(text_tower_for(store.config, options.text_weights), text)
    reduction = store.reduction_basis
    embedding = query.embeddings[0].float()
    feature = reduction.project(embedding) if reduction is not None else embedding
    if feature.shape[-1] != store.feature_dim:
        raise ValueError(f"the text embedding has {feature.shape[-1]} channels but the run's features "
                         f"{store.feature_dim}: were they extracted with text-space True?")
    return ResolvedQuery(feature.cpu(), f"text {text!r}", {"source": "text", "text": text,
                         "negatives": json.dumps(list(query.negatives))}, text=query, reduction=reduction,
                         full=embedding.cpu())


def save_resolved_query(path: Path, run, query: ResolvedQuery) -> None:
    """Write the query as ``query_feature.safetensors`` in ``mvfm-segment``'s format (feature space, backbone,
    the full-channel feature when the run's features are PCA-reduced), so either tool can reuse it."""
    save_store_query(path, query.feature, run.feature_store, {**query.metadata, "run": str(run.config_path)},
                     query.full)
