"""Feature-map utilities shared by evaluation, caches, segmentation and the viewer.

* :class:`PCABasis` / :func:`fit_pca`: a fixed linear projection of features (to D dims
  for caches, or to 3 dims + fixed colour range for display, so renders never flicker);
* :func:`cosine_similarity` and :func:`segment`: query-feature similarity maps and masks;
  :func:`overlay_mask` tints a mask over an image (:data:`MASK_COLOR`); :func:`heatmap_rgb`
  colours values on a fixed range (turbo), so maps of different views compare by colour;
* :class:`FeatureDisplay`: an ``nn.Module`` holding a display basis, a query feature and a
  threshold, turning a rendered feature image into ``feature_pca``/``similarity``/
  ``segmentation`` outputs (used by the Nerfstudio models; no Nerfstudio import here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "PCABasis",
    "fit_pca",
    "cosine_similarity",
    "segment",
    "overlay_mask",
    "heatmap_rgb",
    "MASK_COLOR",
    "FeatureDisplay",
]

MASK_COLOR = (1.0, 0.25, 0.1)
"""RGB tint of segmentation overlays (``mvfm-segment``'s overview and the viewer's ``segmentation_overlay``)."""


@dataclass
class PCABasis:
    """Affine projection ``y = (x - mean) @ components.T`` with a per-channel display range.

    Attributes:
        mean: ``[D]``.
        components: ``[K, D]`` orthonormal rows, largest variance first.
        lo, hi: ``[K]`` robust range of the projections on the fitting data (1st/99th percentile).
    """

    mean: torch.Tensor
    components: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., K]``."""
        return (x - self.mean.to(x)) @ self.components.to(x).T

    def unproject(self, y: torch.Tensor) -> torch.Tensor:
        """``[..., K] -> [..., D]`` (exact inverse on the span of the components)."""
        return y @ self.components.to(y) + self.mean.to(y)

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., 3]`` colours in [0, 1] from the first three components and the fixed range."""
        y = self.project(x)[..., :3]
        lo, hi = self.lo[:3].to(y), self.hi[:3].to(y)
        return ((y - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)

    def state(self) -> Dict[str, torch.Tensor]:
        return {"mean": self.mean, "components": self.components, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor]) -> "PCABasis":
        return cls(state["mean"], state["components"], state["lo"], state["hi"])


def fit_pca(features: torch.Tensor, k: int, max_samples: int = 100_000, seed: int = 0) -> PCABasis:
    """Fit a PCA basis to ``[N, D]`` feature vectors (subsampled deterministically to ``max_samples``).

    Component signs are fixed (largest-magnitude loading positive) so refits on the same
    data give the same colours.
    """
    if features.ndim != 2:
        raise ValueError(f"fit_pca expects [N, D] features, got {tuple(features.shape)}")
    n, d = features.shape
    if k > d:
        raise ValueError(f"cannot keep {k} PCA components of {d}-dimensional features")
    x = features.float()
    if n > max_samples:
        g = torch.Generator().manual_seed(seed)
        x = x[torch.randperm(n, generator=g)[:max_samples].to(x.device)]  # device: CPU generator
    mean = x.mean(0)
    # covariance eigendecomposition in float64: D is small (<= 1024) and this is exact and deterministic
    xc = (x - mean).double()
    cov = xc.T @ xc / max(1, xc.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    comps = evecs.flip(-1).T[:k]  # largest first
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = (comps * sign).float()
    y = (x - mean) @ comps.T
    q = torch.quantile(y[: min(len(y), 50_000)], torch.tensor([0.01, 0.99], device=y.device), dim=0)
    return PCABasis(mean=mean, components=comps, lo=q[0], hi=q[1])


def cosine_similarity(features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``[..., D]`` features with a ``[D]`` query -> ``[..., 1]`` in [-1, 1]."""
    return F.cosine_similarity(features, query.to(features).expand_as(features), dim=-1, eps=1e-8).unsqueeze(-1)


def segment(similarity: torch.Tensor, threshold: float) -> torch.Tensor:
    """Binary mask (float 0/1, same shape) where similarity >= threshold."""
    return (similarity >= threshold).to(similarity.dtype)


def overlay_mask(rgb: torch.Tensor, mask: torch.Tensor, alpha: float = 0.55,
                 color: Tuple[float, float, float] = MASK_COLOR) -> torch.Tensor:
    """Tint ``rgb [..., 3]`` (in [0, 1]) by ``color`` where ``mask [...]`` or ``[..., 1]`` (0/1 or bool)."""
    m = mask.to(rgb.dtype)
    if m.ndim == rgb.ndim - 1:
        m = m[..., None]
    a = alpha * m
    return rgb * (1 - a) + rgb.new_tensor(color) * a


def heatmap_rgb(values: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Turbo colours ``[..., 3]`` (float in [0, 1]) of ``t = clamp((values - lo) / (hi - lo), 0, 1)``.

    The range is fixed (never stretched to the data), so equal values get equal colours in every
    image: ``lo`` is dark blue, the middle green, ``hi`` dark red. Same lookup as matplotlib's
    ``colormaps["turbo"](t)``: entry ``min(floor(256 t), 255)`` of its 256-colour table; NaN is
    black (matplotlib's "bad" colour).
    """
    if not hi > lo:
        raise ValueError(f"heatmap_rgb needs hi > lo, got lo={lo}, hi={hi}")
    import matplotlib

    lut = torch.tensor(matplotlib.colormaps["turbo"].colors, dtype=torch.float64, device=values.device)  # [256, 3]
    t = ((values.float() - lo) / (hi - lo)).clamp(0, 1)
    index = (t.nan_to_num(0.0) * lut.shape[0]).long().clamp_max(lut.shape[0] - 1)
    rgb = lut[index].masked_fill(t.isnan()[..., None], 0.0)
    return rgb.to(values.dtype if values.is_floating_point() else torch.float32)


class FeatureDisplay(nn.Module):
    """Fixed-projection display and query-based segmentation of rendered features.

    Buffers (saved with the model): the display basis (``mean [D]``, ``components [3, D]``,
    ``lo/hi [3]``), the ``query [D]`` feature and whether a query is set. The threshold is
    a plain attribute (a viewer slider sets it).

    Args:
        feature_dim: D.
        threshold: initial segmentation threshold on cosine similarity.
    """

    def __init__(self, feature_dim: int, threshold: float = 0.7):
        super().__init__()
        self.feature_dim = feature_dim
        self.threshold = threshold
        self.register_buffer("pca_mean", torch.zeros(feature_dim))  # device: buffer
        self.register_buffer("pca_components", torch.eye(3, feature_dim))  # device: buffer
        self.register_buffer("pca_lo", -torch.ones(3))  # device: buffer
        self.register_buffer("pca_hi", torch.ones(3))  # device: buffer
        self.register_buffer("query", torch.zeros(feature_dim))  # device: buffer
        self.register_buffer("has_query", torch.zeros((), dtype=torch.bool))  # device: buffer

    @property
    def basis(self) -> PCABasis:
        return PCABasis(self.pca_mean, self.pca_components, self.pca_lo, self.pca_hi)

    @torch.no_grad()
    def set_basis(self, basis: PCABasis) -> None:
        if basis.components.shape != (3, self.feature_dim) and basis.components.shape[-1] == self.feature_dim:
            basis = PCABasis(basis.mean, basis.components[:3], basis.lo[:3], basis.hi[:3])
        self.pca_mean.copy_(basis.mean)
        self.pca_components.copy_(basis.components)
        self.pca_lo.copy_(basis.lo)
        self.pca_hi.copy_(basis.hi)

    @torch.no_grad()
    def fit_basis(self, features: torch.Tensor) -> None:
        """Refit the display basis to ``[..., D]`` features (e.g. the current render)."""
        self.set_basis(fit_pca(features.reshape(-1, self.feature_dim), 3))

    @torch.no_grad()
    def set_query(self, query: Optional[torch.Tensor]) -> None:
        """Set the ``[D]`` query feature, or clear it with None."""
        if query is None:
            self.query.zero_()
            self.has_query.fill_(False)
        else:
            self.query.copy_(query.reshape(self.feature_dim))
            self.has_query.fill_(True)

    def forward(self, feature: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``feature [..., D]`` -> ``feature_pca [..., 3]`` and, with a query set, ``similarity``/``segmentation`` ``[..., 1]``."""
        out = {"feature_pca": self.basis.to_rgb(feature.detach())}
        if bool(self.has_query):
            sim = cosine_similarity(feature.detach(), self.query)
            out["similarity"] = sim
            out["segmentation"] = segment(sim, self.threshold)
        return out
