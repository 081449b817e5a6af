"""The multi-view foundation model: architecture config, adapters, checkpoints and the one model builder."""

from .attention import CrossViewAttention
from .build import ModelSpec, build_model, create_mvfm, spec_from_checkpoint
from .checkpoint import load_adapters, read_adapter_metadata, save_adapters
from .config import RUNTIME_FIELDS, MVFMConfig
from .mvfm import MultiViewFoundationModel, MVAdapter

__all__ = [
    "CrossViewAttention",
    "MVAdapter",
    "MVFMConfig",
    "ModelSpec",
    "MultiViewFoundationModel",
    "RUNTIME_FIELDS",
    "build_model",
    "create_mvfm",
    "load_adapters",
    "read_adapter_metadata",
    "save_adapters",
    "spec_from_checkpoint",
]
