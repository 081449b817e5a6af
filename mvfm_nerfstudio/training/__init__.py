"""Training MV-Adapters: losses, the adapter trainer (``mvfm-train``), DDP, per-scene adaptation.

::

    from mvfm_nerfstudio.training import Trainer, TrainConfig, adapt_to_scene, load_preset
    ckpt = adapt_to_scene("data/scene", steps=300, weights="pretrained")   # -> adapters.safetensors
    Trainer(load_preset("scene-adapt-cpu")).train()
"""

from .adapt import DEFAULT_ADAPT_PRESET, adapt_to_scene
from .config import TrainConfig, config_from_dict, config_to_dict, list_presets, load_preset
from .losses import base_regularizer, info_nce_loss, location_loss, soft_argmax
from .scene_data import SceneData, ViewSet, build_view_sets, heldout_view_sets, prepare_scene
from .trainer import Trainer, build_model, latest_checkpoint

__all__ = [
    "DEFAULT_ADAPT_PRESET",
    "SceneData",
    "TrainConfig",
    "Trainer",
    "ViewSet",
    "adapt_to_scene",
    "base_regularizer",
    "build_model",
    "build_view_sets",
    "config_from_dict",
    "config_to_dict",
    "heldout_view_sets",
    "info_nce_loss",
    "latest_checkpoint",
    "list_presets",
    "load_preset",
    "location_loss",
    "prepare_scene",
    "soft_argmax",
]
