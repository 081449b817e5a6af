"""Text queries of text-space features: LERF's relevancy against canonical negatives, and its masks.

Relevancy (Kerr et al., LERF, ICCV 2023): with unit feature ``f`` and unit text embeddings of the query ``q`` and
of the canonical negatives ``n_1..n_K`` ("object", "things", "stuff", "texture"),

    relevancy(f) = min_i  exp(T f.q) / (exp(T f.q) + exp(T f.n_i))  =  min_i sigmoid(T (f.q - f.n_i)),   T = 10,

the pairwise softmax of the query against each negative, taking the negative the query beats least. It is 0.5
where the query ties with the strongest negative; :data:`DEFAULT_RELEVANCY_THRESHOLD` = 0.5 keeps the cells where
the query wins against every negative.

Features may be PCA-reduced (the feature store's ``reduction`` basis, ``f = mean + z @ components``): the cosines
are then computed exactly for the reconstructed ``f`` from the reduced ``z`` without expanding it (the components
are orthonormal, so ``|f|^2 = |z|^2 + 2 z.(components mean) + |mean|^2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..features import PCABasis
from .tower import CLIPTextTower

__all__ = [
    "CANONICAL_NEGATIVES",
    "RELEVANCY_TEMPERATURE",
    "DEFAULT_RELEVANCY_THRESHOLD",
    "lerf_relevancy",
    "TextQuery",
    "relevancy_for_query",
    "relevancy_mask",
]

CANONICAL_NEGATIVES: Tuple[str, ...] = ("object", "things", "stuff", "texture")
"""LERF's canonical negative phrases."""
RELEVANCY_TEMPERATURE = 10.0
"""LERF's softmax temperature on cosine similarities."""
DEFAULT_RELEVANCY_THRESHOLD = 0.5
"""Relevancy at which the query ties with its strongest negative; masks keep ``relevancy >= threshold``."""


def lerf_relevancy(positive: torch.Tensor, negatives: torch.Tensor,
                   temperature: float = RELEVANCY_TEMPERATURE) -> torch.Tensor:
    """LERF relevancy from cosines: ``positive [...]`` with the query, ``negatives [..., K]`` with the negatives ->
    ``[...]`` in (0, 1): ``min_k softmax(T [positive, negatives_k])[0]``."""
    if negatives.shape[:-1] != positive.shape or negatives.shape[-1] < 1:
        raise ValueError(f"negatives must be [..., K>=1] for positive {tuple(positive.shape)}, got {tuple(negatives.shape)}")
    return torch.sigmoid(temperature * (positive[..., None] - negatives)).amin(-1)


@dataclass
class TextQuery:
    """A text query and its canonical negatives as unit embeddings in CLIP's joint space.

    Attributes:
        text: the query phrase.
        negatives: the negative phrases.
        embeddings: ``[1 + K, E]`` unit vectors, the query first.
        temperature: softmax temperature of the relevancy.
    """

    text: str
    negatives: Tuple[str, ...]
    embeddings: torch.Tensor
    temperature: float = RELEVANCY_TEMPERATURE

    @classmethod
    def encode(cls, tower: CLIPTextTower, text: str, negatives: Sequence[str] = CANONICAL_NEGATIVES) -> "TextQuery":
        """Encode ``text`` and ``negatives`` with ``tower`` (a text query needs at least one negative)."""
        negatives = tuple(negatives)
        if not negatives:
            raise ValueError("a text query needs at least one negative phrase (LERF's: object, things, stuff, texture)")
        return cls(text, negatives, tower.encode([text, *negatives]).cpu())

    def cosines(self, features: torch.Tensor, reduction: Optional[PCABasis] = None) -> torch.Tensor:
        """Cosine of every feature with the query and each negative: ``[..., D] -> [..., 1 + K]``.

        Args:
            features: text-space features (``E`` channels), or PCA-reduced ones (``D`` channels of ``reduction``).
            reduction: the basis the features were reduced with (the feature store's ``reduction_basis``), or None.
        """
        emb = self.embeddings.to(features.device, torch.float32)
        f = features.float()
        if reduction is None:
            if f.shape[-1] != emb.shape[-1]:
                raise ValueError(
                    f"features have {f.shape[-1]} channels but the text embeddings {emb.shape[-1]}: text queries need "
                    "text-space features (FeatureStoreConfig.text_space=True, --features.text-space True), or pass "
                    "the PCA basis they were reduced with")
            return F.normalize(f, dim=-1, eps=1e-8) @ emb.T
        comps, mean = reduction.components.to(f), reduction.mean.to(f)  # [D, E], [E]
        if comps.shape != (f.shape[-1], emb.shape[-1]):
            raise ValueError(f"the reduction basis maps {comps.shape[1]} -> {comps.shape[0]} channels; the features have "
                             f"{f.shape[-1]} and the text embeddings {emb.shape[-1]}: not text-space features?")
        dots = f @ (emb @ comps.T).T + emb @ mean
        norm2 = (f * f).sum(-1) + 2 * (f @ (comps @ mean)) + mean @ mean
        return dots / norm2.clamp_min(1e-16).sqrt()[..., None]

    def relevancy(self, features: torch.Tensor, reduction: Optional[PCABasis] = None) -> torch.Tensor:
        """LERF relevancy ``[...]`` in (0, 1) of ``[..., D]`` features (see :meth:`cosines` for ``reduction``)."""
        cos = self.cosines(features, reduction)
        return lerf_relevancy(cos[..., 0], cos[..., 1:], self.temperature)


def relevancy_for_query(features: torch.Tensor, text: str, tower: CLIPTextTower,
                        reduction: Optional[PCABasis] = None,
                        negatives: Sequence[str] = CANONICAL_NEGATIVES) -> torch.Tensor:
    """LERF relevancy ``[...]`` of text-space ``features [..., D]`` for the phrase ``text`` (one call: encodes the
    query with ``tower``, see :class:`TextQuery`; ``reduction`` = the store's PCA basis when the features are
    reduced)."""
    return TextQuery.encode(tower, text, negatives).relevancy(features, reduction)


def relevancy_mask(relevancy: torch.Tensor, threshold: float = DEFAULT_RELEVANCY_THRESHOLD) -> torch.Tensor:
    """Boolean mask ``relevancy >= threshold`` (0.5: the query beats every negative)."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the relevancy threshold is in [0, 1] (0.5 = the query ties with a negative), got {threshold}")
    return relevancy >= threshold
