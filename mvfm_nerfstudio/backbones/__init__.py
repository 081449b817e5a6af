"""Backbone registry and block-by-block access to timm ViTs."""

from .registry import BackboneSpec, UnknownBackboneError, get_backbone_spec, list_backbones, register_backbone
from .vit import (
    CheckpointMismatchError,
    FoundationBackbone,
    ImageSizeError,
    TokenContext,
    WeightsUnavailableError,
    create_backbone,
)

__all__ = [
    "BackboneSpec",
    "CheckpointMismatchError",
    "FoundationBackbone",
    "ImageSizeError",
    "TokenContext",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
]
