"""``mvfm-features``: nerfacto plus a feature field distilled from cached MVFM features.

Design:

* RGB, density, proposal sampling and all nerfacto losses are unchanged (subclass).
* A separate **feature field** (multi-resolution hash grid, PyTorch fallback on CPU, then a
  small MLP) maps a 3D position to a ``D``-dim feature, ``D`` = the feature cache's
  dimension (read from the training dataset metadata the datamanager fills in).
* Rendering: ``feature = sum_i w_i f_i / max(sum_i w_i, 1e-3)`` over nerfacto's final
  samples with the weights **detached**: the feature loss never moves the geometry
  (RGB alone decides where surfaces are), and normalising by the accumulation lets rays
  that are not yet opaque still match their target. With ``feature_samples_per_ray = k``
  the sums run over each ray's ``k`` highest-weight samples only (k field evaluations per
  ray instead of all of them).
* Feature loss (``feature_loss``): ``"mse"`` (default; mean squared error over rays and
  channels, on the PCA-centred cached features, so it matches direction *and* magnitude)
  or ``"cosine"`` (``1 - cos``, scale-free) or ``"mse+cosine"``; scaled by
  ``feature_loss_mult``.
* Outputs: ``feature`` ``[..., D]``; ``feature_pca`` ``[..., 3]`` through one fixed
  projection (:class:`~mvfm_nerfstudio.features.FeatureDisplay`, basis taken from the
  feature cache at setup and saved in the checkpoint, so the viewer does not flicker);
  once a query feature is set, ``similarity`` and ``segmentation`` ``[..., 1]`` (full frames
  from ``get_outputs_for_camera``: colour images, :mod:`.viewer_panels`).
* :meth:`MVFMFeaturesModel.feature_at_ray` renders the feature (and depth) along one ray (the
  viewer's click-to-query).
* The feature loss and metric, display basis, query, viewer panels and the lazy LPIPS are the
  shared feature head (:mod:`.feature_head`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Tuple, Type

import torch
from nerfstudio.cameras.rays import RayBundle, RaySamples
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.field_components.encodings import HashEncoding
from nerfstudio.field_components.mlp import MLP
from nerfstudio.model_components.renderers import DepthRenderer
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from torch import nn
from torch.nn import Parameter

from .feature_head import FeatureHeadConfig, FeatureHeadMixin, check_ray

__all__ = ["MVFMFeaturesModelConfig", "MVFMFeaturesModel", "FeatureField"]


class FeatureField(nn.Module):
    """Hash grid + MLP: normalised positions ``[..., 3]`` in [0, 1] -> features ``[..., D]``."""

    def __init__(self, out_dim: int, num_levels: int, max_res: int, log2_hashmap_size: int, features_per_level: int,
                 hidden_dim: int, num_layers: int, implementation: Literal["tcnn", "torch"]):
        super().__init__()
        self.encoding = HashEncoding(
            num_levels=num_levels,
            min_res=16,
            max_res=max_res,
            log2_hashmap_size=log2_hashmap_size,
            features_per_level=features_per_level,
            implementation=implementation,
        )
        self.mlp = MLP(
            in_dim=self.encoding.get_out_dim(),
            num_layers=num_layers,
            layer_width=hidden_dim,
            out_dim=out_dim,
            activation=nn.ReLU(),
            out_activation=None,
            implementation=implementation,
        )

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        flat = positions.reshape(-1, 3)
        out = self.mlp(self.encoding(flat))
        return out.view(*positions.shape[:-1], -1).float()


class _CapturingDepthRenderer(DepthRenderer):
    """nerfacto's expected-depth renderer, which is called with the final samples and their weights;
    it also remembers them (per thread: the viewer renders while training runs)."""

    def __init__(self, method: str = "expected"):
        super().__init__(method=method)
        self._local = threading.local()

    def forward(self, weights, ray_samples, ray_indices=None, num_rays=None):
        self._local.last = (weights, ray_samples)
        return super().forward(weights=weights, ray_samples=ray_samples, ray_indices=ray_indices, num_rays=num_rays)

    def pop(self) -> Tuple[torch.Tensor, RaySamples]:
        last = getattr(self._local, "last", None)
        if last is None:
            raise RuntimeError("nerfacto did not render expected depth: cannot attach features to its samples")
        self._local.last = None
        return last


@dataclass
class MVFMFeaturesModelConfig(FeatureHeadConfig, NerfactoModelConfig):
    """nerfacto + an MVFM feature field (the feature dimension comes from the datamanager's feature cache)."""

    _target: Type = field(default_factory=lambda: MVFMFeaturesModel)
    feature_num_levels: int = 12
    """Hash-grid levels of the feature field."""
    feature_max_res: int = 256
    """Finest hash-grid resolution of the feature field (features are smoother than colour)."""
    feature_log2_hashmap_size: int = 17
    """log2 of the feature field's hash table size per level."""
    feature_features_per_level: int = 2
    """Features per hash-grid level of the feature field."""
    feature_hidden_dim: int = 64
    """Width of the feature field's MLP."""
    feature_num_layers: int = 2
    """Layers of the feature field's MLP."""
    feature_samples_per_ray: int = 0
    """Evaluate the feature field only at each ray's this many highest-weight samples (weights renormalised over
    them); 0 = at every sample. Fewer evaluations are faster; the field is smooth and nerfacto's weights
    concentrate at the surface, so a few samples carry almost all of the weight."""


class MVFMFeaturesModel(FeatureHeadMixin, NerfactoModel):
    """nerfacto with a feature field supervised by MVFM features (see the module docstring)."""

    config: MVFMFeaturesModelConfig
    datamanager_hint = "the MVFM datamanager (mvfm_nerfstudio.nerfstudio_plugin.datamanager.MVFMDataManagerConfig)"

    def populate_modules(self):
        super().populate_modules()  # nerfacto, then the feature head (display, panels)
        c = self.config
        self.feature_field = FeatureField(
            self.feature_dim, c.feature_num_levels, c.feature_max_res, c.feature_log2_hashmap_size,
            c.feature_features_per_level, c.feature_hidden_dim, c.feature_num_layers, c.implementation,
        )
        self.renderer_expected_depth = _CapturingDepthRenderer(method="expected")

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_param_groups()
        groups["feature_field"] = list(self.feature_field.parameters())
        return groups

    def _normalized_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """World positions ``[..., 3]`` -> [0, 1]^3, normalised exactly as nerfacto's field does."""
        if self.field.spatial_distortion is not None:
            return (self.field.spatial_distortion(positions) + 2.0) / 4.0
        return SceneBox.get_normalized_positions(positions, self.field.aabb)

    def render_features(self, ray_samples: RaySamples, weights: torch.Tensor) -> torch.Tensor:
        """``[R, D]`` = accumulation-normalised weighted sum of the feature field over the samples
        (over the ``feature_samples_per_ray`` highest-weight samples of each ray when that is set)."""
        w = weights.detach()  # [R, N, 1]
        positions = ray_samples.frustums.get_positions().detach()  # [R, N, 3]
        k = self.config.feature_samples_per_ray
        if 0 < k < w.shape[-2]:
            w, idx = w.topk(k, dim=-2, sorted=False)  # [R, k, 1]
            positions = positions.gather(-2, idx.expand(*idx.shape[:-1], 3))
        feats = self.feature_field(self._normalized_positions(positions))
        return (w * feats).sum(dim=-2) / w.sum(dim=-2).clamp_min(1e-3)

    def get_outputs(self, ray_bundle: RayBundle):
        outputs = super().get_outputs(ray_bundle)
        weights, ray_samples = self.renderer_expected_depth.pop()
        feature = self.render_features(ray_samples, weights)
        outputs["feature"] = feature
        outputs.update(self.feature_display(feature))
        return outputs

    def feature_pair(self, outputs, batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rendered and cached features of the batch's rays, both ``[R, D]``."""
        return outputs["feature"], batch["feature"].to(outputs["feature"])

    @torch.no_grad()
    def feature_at_ray(self, origin: torch.Tensor, direction: torch.Tensor, camera_index: int = 0,
                       with_depth: bool = False):
        """Render the feature along one ray.

        Args:
            origin: ``[3]`` ray origin in the model's world frame (Nerfstudio's dataparser-normalised
                coordinates, i.e. the frame of ``Cameras.camera_to_worlds``; the viewer's scene
                coordinates divided by ``VISER_NERFSTUDIO_SCALE_RATIO``).
            direction: ``[3]`` ray direction (any length > 0).
            camera_index: training camera whose appearance embedding to use (irrelevant for features).
            with_depth: also return the surface distance.

        Returns:
            ``[D]`` feature (float32, on the model's device); with ``with_depth``, ``(feature, depth)``
            where ``depth`` ``[]`` is nerfacto's median depth along the unit direction (world units),
            NaN when the ray's accumulation is below 0.5 (it hits nothing).
        """
        origin, direction = check_ray(origin, direction, self.device)
        bundle = RayBundle(
            origins=origin[None],
            directions=direction[None],
            pixel_area=torch.full((1, 1), 1e-6, device=self.device),
            camera_indices=torch.full((1, 1), camera_index, dtype=torch.long, device=self.device),
        )
        was_training = self.training
        self.eval()
        try:
            outputs = self.forward(bundle)
        finally:
            self.train(was_training)
        if not with_depth:
            return outputs["feature"][0]
        depth = outputs["depth"].reshape(-1)[0]
        return outputs["feature"][0], torch.where(outputs["accumulation"].reshape(-1)[0] >= 0.5, depth, torch.nan)
