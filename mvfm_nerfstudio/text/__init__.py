"""Open-vocabulary text queries of text-space MVFM features (layer 6; no Nerfstudio import).

* :mod:`.tower`: the CLIP text tower of a backbone with one (``clip_vitb16``), via open_clip, with the backbone's
  three weight options (:func:`create_text_tower`, :func:`text_tower_for`);
* :mod:`.relevancy`: LERF's relevancy against canonical negatives (:class:`TextQuery`,
  :func:`relevancy_for_query`, :func:`relevancy_mask`).

Text-space features come from the feature store with ``FeatureStoreConfig(text_space=True)`` (the backbone's
last block runs the MaskCLIP value path and CLIP's image projection maps every patch token); see
docs/text_queries.md. Typical use::

    tower = text_tower_for(store.config)                      # same backbone and weights as the features
    query = TextQuery.encode(tower, "red mug")
    rel = query.relevancy(store.feature_map(0), store.reduction_basis)   # [h, w] in (0, 1)
    mask = relevancy_mask(rel)                                # >= 0.5: the query beats every negative
"""

from __future__ import annotations

from typing import Optional

from ..models.build import ModelSpec
from ..utils.runtime import DeviceLike
from .relevancy import (
    CANONICAL_NEGATIVES,
    DEFAULT_RELEVANCY_THRESHOLD,
    RELEVANCY_TEMPERATURE,
    TextQuery,
    lerf_relevancy,
    relevancy_for_query,
    relevancy_mask,
)
from .tower import CLIPTextTower, create_text_tower

__all__ = [
    "CANONICAL_NEGATIVES",
    "CLIPTextTower",
    "DEFAULT_RELEVANCY_THRESHOLD",
    "RELEVANCY_TEMPERATURE",
    "TextQuery",
    "create_text_tower",
    "lerf_relevancy",
    "relevancy_for_query",
    "relevancy_mask",
    "text_tower_for",
]


def text_tower_for(spec: ModelSpec, text_weights: Optional[str] = None,
                   device: Optional[DeviceLike] = None) -> CLIPTextTower:
    """The text tower matching the features of ``spec`` (a ModelSpec or FeatureStoreConfig): same backbone, tiny
    flag and seed; weights ``text_weights``, or the backbone's own weights option when None.

    Raises:
        ValueError: ``spec`` has ``text_space=False`` (its features are not in the text space: relevancy would mean
            nothing).
        NoTextTowerError, WeightsUnavailableError, CheckpointMismatchError: as :func:`create_text_tower`.
    """
    if not getattr(spec, "text_space", True):
        raise ValueError("these features are not in CLIP's text space: extract them with text_space=True "
                         "(--features.text-space True) to query them with text")
    return create_text_tower(spec.backbone, text_weights if text_weights is not None else spec.weights,
                             tiny=spec.tiny, seed=spec.model_seed, device=device)
