"""Masks from one query feature: cosine-similarity grids, one (Otsu) threshold for all views, IoU."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch

from ..features import cosine_similarity
from ..geometry.feature_grid import resize_map

__all__ = ["MultiViewSegmentation", "similarity_grid", "otsu_threshold", "pooled_otsu_threshold", "segment_views",
           "mask_iou"]


def similarity_grid(feature_map: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[h, w]`` of a ``[h, w, D]`` feature map with a ``[D]`` query."""
    if feature_map.shape[-1] != query.shape[-1]:
        raise ValueError(f"query has {query.shape[-1]} channels but the features have {feature_map.shape[-1]}")
    return cosine_similarity(feature_map.float(), query.float())[..., 0]


def otsu_threshold(hist: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> float:
    """Otsu's threshold of a histogram with equal bins over ``[lo, hi]``.

    Maximises the between-class variance of {bins <= k} vs {bins > k}; returns the upper edge
    of bin ``k`` (so ``value >= threshold`` selects the upper class). When the maximum is a
    plateau (empty bins between two modes) the middle of the plateau is returned. With a single
    occupied bin there is nothing to split: its lower edge is returned (everything is selected).
    Values should come from :func:`pooled_otsu_threshold`, which bins over their own range.
    """
    p = hist.double().flatten()
    total = p.sum()
    if total <= 0:
        raise ValueError("otsu_threshold: empty histogram")
    p = p / total
    bins = p.numel()
    centres = lo + (torch.arange(bins, dtype=torch.float64, device=p.device) + 0.5) * (hi - lo) / bins
    omega = p.cumsum(0)
    mu = (p * centres).cumsum(0)
    denom = omega * (1 - omega)
    valid = denom > 1e-12
    if not bool(valid.any()):  # a single occupied bin: nothing to split, so all of it is the upper class
        occupied = int(torch.nonzero(p)[0])
        return float(lo + occupied * (hi - lo) / bins)
    between = torch.where(valid, (mu[-1] * omega - mu) ** 2 / denom.clamp_min(1e-12), torch.zeros_like(p))
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).flatten().double()
    k = float(best.mean())
    return float(lo + (k + 1) * (hi - lo) / bins)


def pooled_otsu_threshold(chunks: Iterable[torch.Tensor], low: float, high: float, bins: int = 512) -> float:
    """Otsu's threshold of the values of all ``chunks`` pooled, binned over their own range ``[low, high]``.

    The bins span the values' range, not the score's nominal one (e.g. [-1, 1] for cosine): Otsu's
    criterion does not change under an affine map of the values, and a narrow spread (all
    similarities within 0.99..1.0, as for barely trained fields) still gets ``bins`` bins instead of
    falling into one, whose upper edge would select nothing. For ``low < high`` the result lies in
    ``(low, high)``: both the segment (``value >= threshold``) and the rest are non-empty.

    Args:
        chunks: tensors of any shape (e.g. one per view, so full-resolution maps need not be held
            together); non-finite values are ignored.
        low, high: the smallest and largest finite value over all chunks.
        bins: number of equal bins.

    Returns:
        The threshold; ``low`` when ``low == high`` (nothing to split: every value is selected).
    """
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"pooled_otsu_threshold: the value range must be finite and ordered, got [{low}, {high}]")
    if low == high:
        return float(low)
    hist = None
    for chunk in chunks:
        # clamp: an upsampled map may step past the range by rounding, and histc drops what is outside it
        counts = torch.histc(chunk.double().flatten().clamp(low, high), bins=bins, min=low, max=high)
        hist = counts if hist is None else hist + counts
    if hist is None:
        raise ValueError("pooled_otsu_threshold: no values")
    return otsu_threshold(hist, low, high)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    union = int((pred | target).sum())
    return 1.0 if union == 0 else int((pred & target).sum()) / union


@dataclass
class MultiViewSegmentation:
    """Similarity grids of all views and one threshold; full-resolution maps on demand.

    Attributes:
        grids: ``N`` similarity grids ``[h, w]`` (cosine, in [-1, 1]).
        image_sizes: ``[N, 2]`` ``(H, W)`` the grids span.
        threshold: cosine threshold (``similarity >= threshold`` is in the segment).
        threshold_mode: ``"fixed"`` or ``"otsu"``.
    """

    grids: List[torch.Tensor]
    image_sizes: torch.Tensor
    threshold: float
    threshold_mode: str

    def __len__(self) -> int:
        return len(self.grids)

    def similarity(self, i: int) -> torch.Tensor:
        """``[H, W]`` similarity of view ``i`` at its original resolution."""
        return resize_map(self.grids[i], tuple(int(v) for v in self.image_sizes[i]))

    def mask(self, i: int) -> torch.Tensor:
        """``[H, W]`` bool mask of view ``i`` at its original resolution."""
        return self.similarity(i) >= self.threshold


def segment_views(
    feature_maps: Union[Sequence[torch.Tensor], Callable[[int], torch.Tensor]],
    image_sizes: torch.Tensor,
    query: torch.Tensor,
    threshold: Optional[float] = None,
    bins: int = 512,
) -> MultiViewSegmentation:
    """Segment every view by cosine similarity to one query feature.

    Args:
        feature_maps: ``N`` maps ``[h, w, D]`` (or ``i -> map``), each spanning its whole image.
        image_sizes: ``[N, 2]`` ``(H, W)`` of the original images.
        query: ``[D]``.
        threshold: cosine threshold; None = Otsu on the pooled full-resolution similarities of all views.
        bins: histogram bins for Otsu (over the similarities' range, see :func:`pooled_otsu_threshold`).

    Raises:
        ValueError: a zero or non-finite query, or features whose similarity to it is the same everywhere.
    """
    n = len(image_sizes)
    get = feature_maps if callable(feature_maps) else feature_maps.__getitem__
    if not bool(torch.isfinite(query).all()) or float(query.float().norm()) < 1e-8:
        raise ValueError("the query feature is zero or not finite: nothing to compare the views with "
                         "(a degenerate feature map or query file)")
    grids = [similarity_grid(get(i), query) for i in range(n)]
    low, high = min(float(g.min()) for g in grids), max(float(g.max()) for g in grids)
    if not high - low > 1e-4:  # also catches NaN
        raise ValueError(f"the features are degenerate: the similarity to the query is {low:.4f}..{high:.4f} in "
                         f"every cell of all {n} views (features all zero or constant), so no mask can be drawn")
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        return MultiViewSegmentation(grids, image_sizes, float(threshold), "fixed")
    # bilinear (and antialiased) resampling only averages, so the grids' range is the upsampled maps' range
    upsampled = (resize_map(g, tuple(int(v) for v in image_sizes[i])) for i, g in enumerate(grids))
    return MultiViewSegmentation(grids, image_sizes, pooled_otsu_threshold(upsampled, low, high, bins), "otsu")
