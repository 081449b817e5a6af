"""Training MV-Adapters: losses, the adapter trainer (``mvfm-train``), DDP, per-scene adaptation.

::

    from mvfm_nerfstudio.training import Trainer, TrainConfig, adapt_to_scene, load_preset
    ckpt = adapt_to_scene("data/scene", steps=300, weights="pretrained")   # -> adapters.safetensors
    Trainer(load_preset("scene-adapt-cpu")).train()
"""

from .adapt import DEFAULT_ADAPT_PRESET, adapt_to_scene
from .config import TrainConfig, config_from_dict, config_to_dict, list_presets, load_preset
from .losses import base_regularizer, info_nce_loss, location_loss, soft_argmax
from .trainer import Trainer, latest_checkpoint

__all__ = [
    "DEFAULT_ADAPT_PRESET",
    "TrainConfig",
    "Trainer",
    "adapt_to_scene",
    "base_regularizer",
    "config_from_dict",
    "config_to_dict",
    "info_nce_loss",
    "latest_checkpoint",
    "list_presets",
    "load_preset",
    "location_loss",
    "soft_argmax",
]
