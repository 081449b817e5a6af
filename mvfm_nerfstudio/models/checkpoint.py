"""Adapter checkpoints: safetensors tensors + JSON-able metadata, never pickle.

A checkpoint holds only what is trained (adapters, ray embedding) and metadata. The functions take a
:class:`~mvfm_nerfstudio.models.mvfm.MultiViewFoundationModel` (the model module imports this one, so the
type is not imported here):

==================  =====================================================
``format``          ``"mvfm-adapters"``
``format_version``  integer as string; readers refuse newer versions
``backbone``        registry name the adapters were trained on
``tiny``            ``"1"`` for the test-size architecture
``config``          :class:`~mvfm_nerfstudio.models.config.MVFMConfig` as JSON
``backbone_weights`` where the backbone weights came from
``backbone_fingerprint`` hash of the backbone weights (warns on mismatch)
``includes_backbone`` ``"1"`` when the file also holds the backbone (version 2, below)
==================  =====================================================

A model whose backbone belongs to its checkpoint (a converted published model,
:attr:`~mvfm_nerfstudio.models.mvfm.MultiViewFoundationModel.published`) is saved self-contained
(``format_version`` 2): besides the adapters, ``backbone.*`` (the backbone state dict, LoRA merged),
``lora.<parameter>.A`` / ``.B`` (the merged LoRA factors, so the base model can be recovered),
``extra.*`` (kept tensors such as SAM's mask decoder) and the metadata ``published_variant``,
``published_source``, ``lora_scale``. :func:`~mvfm_nerfstudio.models.published.load_published` reads them.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Dict, Optional

from torch import nn

from .._version import __version__
from ..errors import CheckpointMismatchError
from ..utils.io import atomic_write
from .config import RUNTIME_FIELDS, MVFMConfig

__all__ = ["FORMAT", "FORMAT_VERSION", "SELF_CONTAINED_PREFIXES", "save_adapters", "load_adapters",
           "read_adapter_metadata", "backbone_fingerprint"]

FORMAT = "mvfm-adapters"
FORMAT_VERSION = 2
"""Newest version written: 1 = adapters only, 2 = self-contained (adapters + backbone + LoRA factors)."""
SELF_CONTAINED_PREFIXES = ("backbone.", "lora.", "extra.")


def backbone_fingerprint(model: nn.Module) -> str:
    """Short content hash of the model's backbone weights (computed once per backbone)."""
    return model.backbone.fingerprint()


def save_adapters(model: nn.Module, path, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model``'s adapters to ``path`` (.safetensors), atomically."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapter checkpoints are .safetensors files, got {str(path)!r}")
    published = dict(getattr(model, "published", {}) or {})
    meta = {
        "format": FORMAT,
        "format_version": "2" if published else "1",
        "backbone": model.backbone.spec.name,
        "tiny": "1" if model.backbone.tiny else "0",
        "config": model.config.to_json(),
        "backbone_weights": model.backbone.weights,
        "backbone_fingerprint": backbone_fingerprint(model),
        "mvfm_nerfstudio_version": __version__,
    }
    for k, v in (metadata or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is reserved")
        meta[k] = str(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.adapter_state_dict().items()}
    if published:  # the backbone belongs to this checkpoint: save it too
        meta.update({"includes_backbone": "1", "lora_scale": repr(float(model.backbone_lora_scale))})
        meta.update({k: str(v) for k, v in published.items()})
        tensors.update({f"backbone.{k}": v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()})
        for name, (a, b) in model.backbone_lora.items():
            tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"] = a.cpu().contiguous(), b.cpu().contiguous()
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in model.extra_tensors.items()})
    atomic_write(path, save(tensors, metadata=meta))


def read_adapter_metadata(path) -> Dict[str, str]:
    """Metadata of an adapter checkpoint; raises a clear error for anything that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:
        raise CheckpointMismatchError(
            f"{str(path)!r} is not a readable safetensors adapter checkpoint ({type(err).__name__}: {err})"
        ) from err
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{str(path)!r} is not an MVFM adapter checkpoint (format={meta.get('format')!r})")
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{str(path)!r} has format version {version}; this mvfm-nerfstudio reads up to {FORMAT_VERSION}: upgrade it"
        )
    return meta


def load_adapters(model: nn.Module, path) -> Dict[str, str]:
    """Load adapters into ``model`` after checking backbone and architecture agree.

    Returns:
        The checkpoint's metadata.
    Raises:
        CheckpointMismatchError: other backbone, other architecture, or inconsistent tensors.
    """
    from safetensors.torch import load_file

    meta = read_adapter_metadata(path)
    problems = []
    if meta["backbone"] != model.backbone.spec.name:
        problems.append(f"backbone: checkpoint {meta['backbone']!r}, model {model.backbone.spec.name!r}")
    if (meta.get("tiny") == "1") != model.backbone.tiny:
        problems.append(f"tiny test backbone: checkpoint {meta.get('tiny') == '1'}, model {model.backbone.tiny}")
    stored = MVFMConfig.from_dict(json.loads(meta["config"])).to_dict()
    current = model.config.to_dict()
    for key in sorted(stored):
        if key not in RUNTIME_FIELDS and stored[key] != current[key]:
            problems.append(f"{key}: checkpoint {stored[key]!r}, model {current[key]!r}")
    if problems:
        raise CheckpointMismatchError(f"adapter checkpoint {str(path)!r} does not fit this model:\n  " + "\n  ".join(problems))
    tensors = load_file(str(path))
    if meta.get("includes_backbone") == "1":  # self-contained: the backbone was built from this file
        tensors = {k: v for k, v in tensors.items() if not k.startswith(SELF_CONTAINED_PREFIXES)}
    own = model.adapter_state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = [k for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(
            f"adapter checkpoint {str(path)!r} tensors do not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(tensors, strict=False)
    stored_print, own_print = meta.get("backbone_fingerprint"), backbone_fingerprint(model)
    if stored_print not in (None, own_print):
        warnings.warn(
            f"adapter checkpoint {os.fspath(path)!r} was trained on other backbone weights "
            f"({meta.get('backbone_weights')!r}, fingerprint {stored_print}) than this model's "
            f"({model.backbone.weights!r}, fingerprint {own_print}); features may be poor",
            stacklevel=2,
        )
    return meta
