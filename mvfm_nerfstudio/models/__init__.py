"""The multi-view foundation model, its adapters and checkpoints."""

from .attention import CrossViewAttention, select_neighbor_views
from .checkpoint import load_adapters, read_adapter_metadata, save_adapters
from .mvfm import RUNTIME_FIELDS, MultiViewFoundationModel, MVAdapter, MVFMConfig, create_mvfm

__all__ = [
    "CrossViewAttention",
    "MVAdapter",
    "MVFMConfig",
    "MultiViewFoundationModel",
    "RUNTIME_FIELDS",
    "create_mvfm",
    "load_adapters",
    "read_adapter_metadata",
    "save_adapters",
    "select_neighbor_views",
]
