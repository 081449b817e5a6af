"""The ``mvfm-features`` method (registered through the ``nerfstudio.method_configs`` entry point).

nerfacto's recipe (same optimisers and schedules) with the single-process MVFM
datamanager and the feature-field model; the feature field gets its own optimiser group.
Options show under ``ns-train mvfm-features --help``, e.g.
``--pipeline.datamanager.features.backbone``, ``...features.weights``,
``...features.adapters``, ``...features.view-grouping``, ``...features.feature-resolution``,
``...features.feature-dim``, ``...features.cache-dir``, ``...features.adapt``.
"""

from __future__ import annotations

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from .datamanager import MVFMDataManagerConfig
from .features_model import MVFMFeaturesModelConfig
from .schedulers import FloatExponentialDecaySchedulerConfig

__all__ = ["mvfm_features_config", "mvfm_features"]


def _adam(lr: float, lr_final: float, max_steps: int) -> dict:
    return {
        "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
        "scheduler": FloatExponentialDecaySchedulerConfig(lr_final=lr_final, max_steps=max_steps),
    }


def mvfm_features_config() -> TrainerConfig:
    """A fresh ``mvfm-features`` trainer config (nerfacto defaults + MVFM feature field)."""
    return TrainerConfig(
        method_name="mvfm-features",
        steps_per_eval_batch=500,
        steps_per_save=2000,
        max_num_iterations=30000,
        mixed_precision=True,  # the trainer turns it off on CPU (bf16 there would be ~100x slower)
        pipeline=VanillaPipelineConfig(
            datamanager=MVFMDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(),
                train_num_rays_per_batch=4096,
                eval_num_rays_per_batch=4096,
            ),
            model=MVFMFeaturesModelConfig(
                eval_num_rays_per_chunk=1 << 15,
                average_init_density=0.01,
                camera_optimizer=CameraOptimizerConfig(mode="SO3xR3"),
            ),
        ),
        optimizers={
            "proposal_networks": _adam(1e-2, 1e-4, 200000),
            "fields": _adam(1e-2, 1e-4, 200000),
            "feature_field": _adam(1e-2, 1e-4, 200000),
            "camera_opt": _adam(1e-3, 1e-4, 5000),
        },
        # the viewer listens on this machine only (Nerfstudio's default, 0.0.0.0, serves every interface): open
        # it deliberately with --viewer.websocket-host 0.0.0.0 (docs/nerfstudio.md, "Viewer exposure")
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host="127.0.0.1"),
        vis="viewer",
    )


mvfm_features = MethodSpecification(
    config=mvfm_features_config(),
    description="NeRF (nerfacto) with a feature field distilled from multi-view foundation model (MVFM) features",
)
