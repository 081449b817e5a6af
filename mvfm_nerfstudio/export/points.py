"""Feature points of a run: surface points of rendered views (NeRF) or Gaussian centres (splats), voxel pooling.

Every point carries its full rendered feature ``[D]`` (the run's feature space: the feature cache's channels,
PCA-reduced when the run was), its colour and where it came from. Positions are in the model's world frame,
Nerfstudio's dataparser-normalised coordinates (the frame of ``Cameras.camera_to_worlds`` and of ``ns-export``;
``dataparser_transforms.json`` in the run folder maps it back to the scene's own frame).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Sequence

import torch

__all__ = ["FeaturePoints", "render_view", "surface_points", "gaussian_features", "gaussian_points", "opacities",
           "voxel_downsample"]


@dataclass
class FeaturePoints:
    """``N`` points with features.

    Attributes:
        positions: ``[N, 3]`` float32, model world frame.
        features: ``[N, D]`` float32, what the model renders there.
        rgb: ``[N, 3]`` float32 in [0, 1]: the rendered colour (NeRF) or the Gaussian's base colour (splats).
        index: int64 ``[N]`` arrays naming each point's origin: ``view``, ``row``, ``col`` (pixel of the rendered
            view) for surface points, ``gaussian`` (index into the run's Gaussians) for splats; empty after voxel
            pooling (a voxel mixes points).
    """

    positions: torch.Tensor
    features: torch.Tensor
    rgb: torch.Tensor
    index: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def select(self, keep: torch.Tensor) -> "FeaturePoints":
        """The points where the bool ``keep [N]`` is true (same order)."""
        return FeaturePoints(self.positions[keep], self.features[keep], self.rgb[keep],
                             {k: v[keep] for k, v in self.index.items()})


@torch.no_grad()
def render_view(model, camera) -> Dict[str, torch.Tensor]:
    """Render one camera (``Cameras`` of shape ``[1]``) with the model's raw outputs, ``[H, W, C]`` each.

    The models' ``get_outputs_for_camera`` adds the viewer panels' post-processing (similarity as colours, a
    refitted PCA when the colours are unlocked); this is the same render without it: ``rgb``, ``depth``,
    ``accumulation``, ``feature`` ``[H, W, D]``, ``feature_pca`` (the run's display basis). NeRF outputs also hold
    the rays: ``ray_origins``, ``ray_directions`` (unit) ``[H, W, 3]``, with ``depth`` the distance along them.
    """
    camera = camera.to(model.device)
    if hasattr(model, "gauss_params"):  # splats render a whole camera at once
        return model.get_outputs(camera)
    rays = camera.generate_rays(camera_indices=0, keep_shape=True)
    outputs = model.get_outputs_for_camera_ray_bundle(rays)
    outputs["ray_origins"], outputs["ray_directions"] = rays.origins, rays.directions
    return outputs


def surface_points(model, cameras, views: Sequence[int], downscale: float = 1.0,
                   min_accumulation: float = 0.5) -> FeaturePoints:
    """Surface points of a NeRF's rendered views: one per pixel whose ray hits something.

    Each view ``i`` of ``cameras`` is rendered at ``1 / downscale`` of its resolution; a pixel with accumulation
    ``>= min_accumulation`` gives the point ``origin + depth * direction`` (nerfacto's median depth along the unit
    ray) with the feature and colour rendered for that pixel.
    """
    if downscale <= 0:
        raise ValueError(f"downscale must be > 0, got {downscale}")
    parts = []
    for i in views:
        cam = cameras[int(i) : int(i) + 1]
        cam.rescale_output_resolution(1.0 / downscale)
        out = render_view(model, cam)
        hit = out["accumulation"][..., 0] >= min_accumulation  # [H, W]
        rows, cols = torch.nonzero(hit, as_tuple=True)
        pos = out["ray_origins"][hit] + out["depth"][hit] * out["ray_directions"][hit]
        parts.append(FeaturePoints(pos.float().cpu(), out["feature"][hit].float().cpu(), out["rgb"][hit].float().cpu(),
                                   {"view": torch.full_like(rows, int(i)).cpu(), "row": rows.cpu(), "col": cols.cpu()}))
    return _concat(parts)


@torch.no_grad()
def gaussian_features(model, chunk: int = 1 << 16) -> torch.Tensor:
    """``[G, D]`` feature of each Gaussian: the decoder applied to its latent.

    A pixel covered by that Gaussian alone renders exactly this (the composited latent is divided by the
    accumulation before decoding); where Gaussians overlap, the decoder sees their blended latents.
    """
    latents = model.gauss_params["latents"]
    return torch.cat([model.feature_decoder(latents[s : s + chunk]).float() for s in range(0, len(latents), chunk)])


@torch.no_grad()
def gaussian_points(model) -> FeaturePoints:
    """Every Gaussian of a splat model as a point: centre, feature (:func:`gaussian_features`), base colour."""
    g = torch.arange(model.num_points)
    return FeaturePoints(model.means.float().cpu(), gaussian_features(model).cpu(),
                         model.colors.clamp(0, 1).float().cpu(), {"gaussian": g})


def opacities(model) -> torch.Tensor:
    """``[G]`` opacity in [0, 1] of each Gaussian."""
    return torch.sigmoid(model.opacities.detach().float().reshape(-1)).cpu()


def voxel_downsample(points: FeaturePoints, voxel_size: float) -> FeaturePoints:
    """Pool points into cubes of side ``voxel_size`` (world units, grid anchored at the origin).

    Each occupied voxel gives one point: the mean position, mean feature (not renormalised) and mean colour of the
    points in it. Voxels are ordered by their integer coordinates (deterministic).
    """
    if voxel_size <= 0:
        raise ValueError(f"voxel size must be > 0 (world units of the model frame), got {voxel_size}")
    if len(points) == 0:
        return points
    cells = torch.floor(points.positions.double() / voxel_size).long()
    _, inverse, counts = torch.unique(cells, dim=0, return_inverse=True, return_counts=True)
    n = int(counts.numel())

    def mean(x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(n, x.shape[1], dtype=torch.float64).index_add_(0, inverse, x.double())
        return (acc / counts[:, None]).float()

    return FeaturePoints(mean(points.positions), mean(points.features), mean(points.rgb), {})


def _concat(parts: Sequence[FeaturePoints]) -> FeaturePoints:
    if not parts:
        raise ValueError("no views to take points from")
    keys = parts[0].index.keys()
    return FeaturePoints(torch.cat([p.positions for p in parts]), torch.cat([p.features for p in parts]),
                         torch.cat([p.rgb for p in parts]), {k: torch.cat([p.index[k] for p in parts]) for k in keys})


def nonempty(points: FeaturePoints, what: str, hint: str) -> FeaturePoints:
    """``points``, or a ValueError naming ``what`` is empty and ``hint`` (how to get some)."""
    if len(points) == 0:
        raise ValueError(f"{what} is empty: {hint}")
    return points


def finite(points: FeaturePoints) -> torch.Tensor:
    """``[N]`` bool: position and feature finite."""
    return torch.isfinite(points.positions).all(-1) & torch.isfinite(points.features).all(-1)
