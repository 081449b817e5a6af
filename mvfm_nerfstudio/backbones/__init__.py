"""Backbone registry and block-by-block access to timm ViTs."""

from .registry import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    UnknownBackboneError,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from .vit import FoundationBackbone, ImageSizeError, TokenContext, cached_pretrained_file, create_backbone

__all__ = [
    "BackboneSpec",
    "DEFAULT_BACKBONE",
    "FoundationBackbone",
    "ImageSizeError",
    "TokenContext",
    "UnknownBackboneError",
    "cached_pretrained_file",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
]
