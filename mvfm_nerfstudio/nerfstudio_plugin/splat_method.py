"""The ``mvfm-splat`` method (registered through the ``nerfstudio.method_configs`` entry point).

splatfacto's recipe (same optimisers, schedules and densification) with the full-image
MVFM datamanager (``data["feature"]``) and :class:`MVFMSplatModel`; the per-Gaussian
latents and the feature decoder get their own optimiser groups. CPU-friendly defaults:
fewer random Gaussians inside the normalised scene box when the scene has no sparse
points (``load_3D_points=True`` seeds from ``ply_file_path`` when present, read without
open3d), images cached
on the training device (as splatfacto), the PyTorch rasteriser compositing each pixel's first 256 contributing
Gaussians. On a GPU, gsplat's CUDA rasteriser is used automatically.

Options show under ``ns-train mvfm-splat --help``, e.g. ``--pipeline.model.latent-dim``,
``--pipeline.model.feature-loss-mult``, ``--pipeline.model.max-gaussians-per-pixel``,
``--pipeline.datamanager.features.backbone``, ``--pipeline.datamanager.features.weights``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Type

import numpy as np
import torch
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import Nerfstudio, NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from .datamanager import MVFMFullImageDatamanagerConfig
from .schedulers import FloatExponentialDecaySchedulerConfig
from .splat_model import MVFMSplatModelConfig

__all__ = ["mvfm_splat_config", "mvfm_splat", "NerfstudioPlyDataParserConfig", "read_ply_points"]


def read_ply_points(path: Path) -> Optional[Dict[str, np.ndarray]]:
    """Vertices of a point-cloud ``.ply`` (ascii or binary): ``xyz [N, 3]`` float32, ``rgb [N, 3]`` uint8 or
    ``[0, 3]`` without colours; None when the file has no vertices."""
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    if vertex.count == 0:
        return None
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], -1).astype(np.float32)
    names = vertex.data.dtype.names
    if all(c in names for c in ("red", "green", "blue")):
        rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1)
        if rgb.dtype.kind == "f":  # float colours in [0, 1]
            rgb = np.round(np.clip(rgb, 0, 1) * 255)
        rgb = rgb.astype(np.uint8)
    else:
        rgb = np.zeros((0, 3), dtype=np.uint8)
    return {"xyz": xyz, "rgb": rgb}


@dataclass
class NerfstudioPlyDataParserConfig(NerfstudioDataParserConfig):
    """Nerfstudio's dataparser (``nerfstudio-data``), reading the seed point cloud (``ply_file_path``) with plyfile
    instead of open3d, whose import needs system libraries (libusb) that minimal machines lack."""

    _target: Type = field(default_factory=lambda: NerfstudioPly)


class NerfstudioPly(Nerfstudio):
    """:class:`Nerfstudio` with an open3d-free point-cloud reader (same outputs)."""

    def _load_3D_points(self, ply_file_path: Path, transform_matrix: torch.Tensor, scale_factor: float):
        points = read_ply_points(ply_file_path)
        if points is None:
            return None
        xyz = torch.from_numpy(points["xyz"])
        xyz = torch.cat([xyz, torch.ones_like(xyz[..., :1])], -1) @ transform_matrix.T * scale_factor
        return {"points3D_xyz": xyz, "points3D_rgb": torch.from_numpy(points["rgb"])}


def _adam(lr: float, scheduler=None) -> dict:
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": scheduler}


def mvfm_splat_config() -> TrainerConfig:
    """A fresh ``mvfm-splat`` trainer config (splatfacto's optimisers + latent features and decoder)."""
    max_steps = 30000
    return TrainerConfig(
        method_name="mvfm-splat",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=max_steps,
        mixed_precision=False,
        pipeline=VanillaPipelineConfig(
            datamanager=MVFMFullImageDatamanagerConfig(
                dataparser=NerfstudioPlyDataParserConfig(load_3D_points=True),
                cache_images="gpu",  # splatfacto's default: images live on the training device (the CPU without CUDA)
                cache_images_type="uint8",
            ),
            model=MVFMSplatModelConfig(num_random=10000, random_scale=2.0),
        ),
        optimizers={
            "means": _adam(1.6e-4, FloatExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps)),
            "features_dc": _adam(0.0025),
            "features_rest": _adam(0.0025 / 20),
            "opacities": _adam(0.05),
            "scales": _adam(0.005),
            "quats": _adam(0.001),
            "latents": _adam(0.0025),
            "feature_decoder": _adam(1e-3, FloatExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps)),
            "camera_opt": _adam(1e-4, FloatExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=max_steps,
                                                                           warmup_steps=1000, lr_pre_warmup=0)),
        },
        # the viewer listens on this machine only (Nerfstudio's default, 0.0.0.0, serves every interface): open
        # it deliberately with --viewer.websocket-host 0.0.0.0 (docs/nerfstudio.md, "Viewer exposure")
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host="127.0.0.1"),
        vis="viewer",
    )


mvfm_splat = MethodSpecification(
    config=mvfm_splat_config(),
    description="Gaussian splatting (splatfacto) with per-Gaussian latent features distilled from multi-view "
                "foundation model (MVFM) features; trains on CPU",
)
