"""The feature head both MVFM models share: config fields, loss and metric terms, display, viewer panels.

:class:`FeatureHeadMixin` goes before the Nerfstudio model in a model's bases
(``class MVFMFeaturesModel(FeatureHeadMixin, NerfactoModel)``) and its config
:class:`FeatureHeadConfig` before the Nerfstudio config. The model provides

* :meth:`FeatureHeadMixin.feature_pair`: the rendered and the target features of a training batch at
  the resolution the loss compares them (rays for the NeRF, maps for the splats);
* ``feature_at_ray(origin, direction, with_depth=False)``: the feature rendered along one ray and, with
  ``with_depth``, the distance to the surface along it (click-to-query and its marker);

and gets ``feature_display`` (:class:`~mvfm_nerfstudio.features.FeatureDisplay`, basis from the feature
cache), ``feature_panels`` (:class:`~.viewer_panels.FeaturePanels`), ``set_query``, the ``feature_loss``
term and ``feature_cosine`` metric, evaluation images with ``feature_pca``, and LPIPS only when asked for.

LPIPS: nerfacto and splatfacto build torchmetrics' LPIPS inside ``populate_modules``, and its
constructor downloads AlexNet weights (fails offline). Nerfstudio has no hook to skip it, so while the
Nerfstudio ``populate_modules`` runs, :func:`deferred_lpips` has that one constructor return a lazy
stand-in (built on first use, only with ``compute_lpips=True``); the class is restored right after,
under a lock, so nothing else in the process sees the substitution.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Literal, Optional, Tuple

import torch
import torch.nn.functional as F

from ..features import FeatureDisplay, PCABasis
from ..models.build import ModelSpec
from ..text import text_tower_for
from .viewer_panels import FeaturePanels

__all__ = [
    "FEATURE_DIM_KEY",
    "DISPLAY_BASIS_KEY",
    "TEXT_SPACE_KEY",
    "FeatureHeadConfig",
    "FeatureHeadMixin",
    "feature_loss",
    "deferred_lpips",
    "check_ray",
]

FEATURE_DIM_KEY = "mvfm_feature_dim"
"""Training-dataset metadata key the MVFM datamanagers fill with the cached feature dimension D."""
DISPLAY_BASIS_KEY = "mvfm_display_basis"
"""Training-dataset metadata key of the cache's 3-component display PCA (a :class:`PCABasis` state)."""
TEXT_SPACE_KEY = "mvfm_text_space"
"""Training-dataset metadata key, present only for text-space features: ``{"spec": ModelSpec fields (backbone,
weights, tiny, model_seed), "reduction": the cache's PCA reduction state or None}`` (the viewer's text box)."""

FeatureLoss = Literal["mse", "cosine", "mse+cosine"]


def feature_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Distillation loss between rendered and cached features ``[R, D]``.

    ``"mse"``: mean squared error over rays and channels (on the PCA-centred cached features it matches
    direction and magnitude); ``"cosine"``: ``1 - cos`` (scale-free); ``"mse+cosine"``: their sum.
    """
    if kind not in ("mse", "cosine", "mse+cosine"):
        raise ValueError(f"feature_loss must be 'mse', 'cosine' or 'mse+cosine', got {kind!r}")
    loss = pred.new_zeros(())
    if "mse" in kind:
        loss = loss + F.mse_loss(pred, target)
    if "cosine" in kind:
        loss = loss + (1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)).mean()
    return loss


def check_ray(origin, direction, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(origin [3], unit direction [3])`` float32 on ``device``; ValueError for a non-finite or zero ray."""
    origin = torch.as_tensor(origin, dtype=torch.float32, device=device).reshape(3)
    direction = torch.as_tensor(direction, dtype=torch.float32, device=device).reshape(3)
    norm = direction.norm()
    if not torch.isfinite(norm) or norm <= 0 or not torch.isfinite(origin).all():
        raise ValueError(f"feature_at_ray needs a finite origin and a non-zero direction, got {origin}, {direction}")
    return origin, direction / norm


class _LazyLPIPS:
    """Stand-in for torchmetrics' LPIPS: built on first call when enabled (its constructor downloads AlexNet)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._metric = None

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.tensor(float("nan"), device=a.device)
        if self._metric is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self._metric = LearnedPerceptualImagePatchSimilarity(normalize=True)
        return self._metric.to(a.device)(a, b)


_LPIPS_LOCK = threading.Lock()


@contextmanager
def deferred_lpips(enabled: bool) -> Iterator[None]:
    """While active (one Nerfstudio ``populate_modules`` call), constructing torchmetrics' LPIPS gives a
    :class:`_LazyLPIPS` (see the module docstring)."""
    import torchmetrics.image.lpip as lpip_module

    with _LPIPS_LOCK:
        original = lpip_module.LearnedPerceptualImagePatchSimilarity
        lpip_module.LearnedPerceptualImagePatchSimilarity = lambda *a, **k: _LazyLPIPS(enabled)  # type: ignore
        try:
            yield
        finally:
            lpip_module.LearnedPerceptualImagePatchSimilarity = original


@dataclass
class FeatureHeadConfig:
    """Options of the feature head (put before the Nerfstudio model config in the bases)."""

    feature_loss: FeatureLoss = "mse"
    """Feature distillation loss: 'mse' (matches direction and magnitude of the PCA-centred cached features),
    'cosine' (1 - cos, scale-free) or their sum."""
    feature_loss_mult: float = 1.0
    """Weight of the feature loss relative to the RGB loss."""
    segmentation_threshold: float = 0.7
    """Initial cosine-similarity threshold of the 'segmentation' output."""
    similarity_range: Tuple[float, float] = (-1.0, 1.0)
    """Cosine similarities at the blue and the red end of the viewer's 'similarity' colours (turbo; fixed, so
    every view and resolution uses the same colours)."""
    text_weights: Optional[str] = None
    """Weights of the CLIP text tower behind the viewer's text box (text-space features only): 'pretrained', a
    local open_clip file or 'random'; None = the feature backbone's weights option."""
    compute_lpips: bool = False
    """Compute LPIPS in evaluation (downloads AlexNet weights on first use; off so training works offline)."""


class FeatureHeadMixin:
    """The shared feature head of the MVFM models (see the module docstring)."""

    datamanager_hint = "the MVFM datamanager"
    """How the model's error message names the datamanager that provides the features."""

    config: FeatureHeadConfig
    feature_display: FeatureDisplay
    feature_panels: FeaturePanels

    def populate_modules(self):
        with deferred_lpips(self.config.compute_lpips):
            super().populate_modules()  # type: ignore[misc]
        metadata = self.kwargs.get("metadata") or {}  # type: ignore[attr-defined]
        if FEATURE_DIM_KEY not in metadata:
            raise ValueError(
                f"the {type(self).__name__} model needs MVFM features: use {self.datamanager_hint}, which puts "
                f"{FEATURE_DIM_KEY!r} into the training dataset metadata"
            )
        self.feature_display = FeatureDisplay(int(metadata[FEATURE_DIM_KEY]), threshold=self.config.segmentation_threshold)
        if metadata.get(DISPLAY_BASIS_KEY) is not None:
            self.feature_display.set_basis(PCABasis.from_state(metadata[DISPLAY_BASIS_KEY]))
        self.feature_panels = FeaturePanels(self, similarity_range=self.config.similarity_range)  # viewer panels
        text = metadata.get(TEXT_SPACE_KEY)
        if text is not None:  # text-space features: the viewer's text box
            spec, weights = ModelSpec(**text["spec"]), self.config.text_weights
            reduction = PCABasis.from_state(text["reduction"]) if text.get("reduction") else None
            self.feature_panels.enable_text(lambda: text_tower_for(spec, weights, device="cpu"), reduction)

    @property
    def feature_dim(self) -> int:
        return self.feature_display.feature_dim

    def set_query(self, query: Optional[torch.Tensor]) -> None:
        """Set (or clear with None) the ``[D]`` query feature behind the similarity/segmentation outputs."""
        self.feature_display.set_query(query)

    def feature_pair(self, outputs: Dict, batch: Dict) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rendered and target features ``[..., D]`` of a training batch, at the loss resolution."""
        raise NotImplementedError

    def get_outputs_for_camera(self, camera, obb_box=None) -> Dict[str, torch.Tensor]:
        """Full-frame render; the viewer panels may refit the PCA colours to it and add ``segmentation_overlay``."""
        return self.feature_panels.after_render(super().get_outputs_for_camera(camera, obb_box=obb_box))  # type: ignore

    def get_metrics_dict(self, outputs, batch):
        metrics = super().get_metrics_dict(outputs, batch)  # type: ignore[misc]
        if "feature" in batch:
            with torch.no_grad():
                pred, target = self.feature_pair(outputs, batch)
                metrics["feature_cosine"] = F.cosine_similarity(pred, target, dim=-1).mean()
        return metrics

    def get_loss_dict(self, outputs, batch, metrics_dict=None):
        loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)  # type: ignore[misc]
        if "feature" in batch:
            pred, target = self.feature_pair(outputs, batch)
            loss_dict["feature_loss"] = self.config.feature_loss_mult * feature_loss(
                pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1]), self.config.feature_loss
            )
        return loss_dict

    def get_image_metrics_and_images(self, outputs, batch):
        """Nerfstudio's evaluation metrics and images, without ``lpips`` unless ``compute_lpips``, plus ``feature_pca``."""
        metrics, images = super().get_image_metrics_and_images(outputs, batch)  # type: ignore[misc]
        if not self.config.compute_lpips:
            metrics.pop("lpips", None)
        images["feature_pca"] = outputs["feature_pca"]
        return metrics, images
