"""The feature cache on disk: content keys, entry layout, reading and writing.

An entry is a folder ``<cache_dir>/<scene>-<key>/`` holding

* ``features.npy``: float16 ``[N, h, w, D]``, read memory-mapped;
* ``bases.safetensors``: the display PCA basis (``display.*``) and, when features were reduced,
  the reduction basis (``reduction.*``);
* ``adapters.safetensors`` (only after per-scene adaptation);
* ``meta.json``: written last, atomically; its presence marks a complete entry.

The key hashes everything the features depend on (:func:`key_ingredients`): image file bytes,
image sizes, cameras, backbone, weights (file contents for weight/adapter files), seed and every
option that changes the features. Changing any of them makes a new entry; old ones stay on disk.
A published model (``adapters="Leoseg/dinov2_reg"``, a folder, a ``.pth``) is keyed by its files' bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..backbones.registry import get_backbone_spec
from ..backbones.vit import cached_fit3d_file, cached_pretrained_file
from ..features import PCABasis
from ..models.published import is_published_source, source_key
from ..utils.io import atomic_write
from .config import FeatureStoreConfig, ViewSource, default_cache_dir

__all__ = ["CACHE_FORMAT_VERSION", "CacheEntry", "hash_file", "key_ingredients", "cache_key", "entry_path",
           "read_entry", "write_bases", "write_meta"]

CACHE_FORMAT_VERSION = 1
"""Bump when the meaning of cached features changes (it is part of every cache key)."""


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    """blake2b (128 bit) of a file's bytes, read in chunks."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
    except OSError as err:
        raise FileNotFoundError(f"cannot read {str(path)!r} to key the feature cache: {err}") from err
    return h.hexdigest()


def _weights_key(backbone: str, weights: str) -> str:
    if weights == "random":
        return "random"
    if weights == "pretrained":
        spec = get_backbone_spec(backbone)
        cached = cached_pretrained_file(spec)
        return f"pretrained:{spec.timm_pretrained_name}:" + (hash_file(Path(cached)) if cached else "not-cached")
    if weights == "fit3d":
        cached = cached_fit3d_file(get_backbone_spec(backbone))
        return "fit3d:" + (hash_file(Path(cached)) if cached else "not-cached")
    return "file:" + hash_file(Path(weights).expanduser())


def _adapters_key(adapters: Optional[str]) -> Optional[str]:
    """Adapters by content: an adapter file's bytes; a published source's files (hub id, folder, .pth or converted
    file: the same model under another name or path is the same entry)."""
    if adapters is None:
        return None
    if is_published_source(adapters):
        return "published:" + source_key(adapters)
    return hash_file(Path(adapters).expanduser())


def key_ingredients(config: FeatureStoreConfig, views: ViewSource, grid: Tuple[int, int]) -> Dict[str, object]:
    """Everything the cached features depend on (JSON-serialisable; reads every image file)."""
    r6 = lambda t: np.round(t.detach().double().cpu().numpy(), 6).tolist()  # noqa: E731
    return {
        "format": CACHE_FORMAT_VERSION,
        "images": [hash_file(Path(p)) for p in views.image_paths],
        "image_sizes": views.image_sizes.tolist(),
        "intrinsics": r6(views.intrinsics),
        "cam_to_world": r6(views.cam_to_world),
        "extra": views.extra_key,
        # a published model's backbone is in its checkpoint: keyed with the adapters
        "weights": "in-adapters" if is_published_source(config.adapters) else _weights_key(config.backbone, config.weights),
        "adapters": _adapters_key(config.adapters),
        "options": config.key_fields(),
        "grid": list(grid),
    }


def cache_key(ingredients: Dict[str, object]) -> str:
    """Short hash of :func:`key_ingredients`."""
    blob = json.dumps(ingredients, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=10).hexdigest()


def entry_path(config: FeatureStoreConfig, scene_name: str, key: str) -> Path:
    """``<cache_dir>/<scene>-<key>`` (the scene name made file-system safe)."""
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in scene_name)[:60] or "scene"
    return root / f"{safe}-{key}"


@dataclass
class CacheEntry:
    """A complete entry, read back: memory-mapped features, PCA bases and metadata."""

    features: np.ndarray
    """``[N, h, w, D]`` float16, memory-mapped."""
    display_basis: PCABasis
    reduction_basis: Optional[PCABasis]
    meta: Dict[str, object]


def read_entry(path: Path, num_images: int, grid: Tuple[int, int]) -> Optional[CacheEntry]:
    """The entry at ``path`` if it is complete and has the expected layout, else None."""
    from safetensors.torch import load_file

    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("key") != path.name.rsplit("-", 1)[-1]:
        return None
    feats = np.load(path / "features.npy", mmap_mode="r")
    h, w = grid
    if feats.shape[:3] != (num_images, h, w) or feats.dtype != np.float16:
        return None
    bases = load_file(str(path / "bases.safetensors"))
    display = PCABasis.from_state({k[len("display."):]: t for k, t in bases.items() if k.startswith("display.")})
    red = {k[len("reduction."):]: t for k, t in bases.items() if k.startswith("reduction.")}
    return CacheEntry(feats, display, PCABasis.from_state(red) if red else None, meta)


def write_bases(path: Path, display: PCABasis, reduction: Optional[PCABasis]) -> None:
    """``bases.safetensors`` of an entry (atomic)."""
    from safetensors.torch import save

    tensors = {f"display.{k}": t.contiguous() for k, t in display.state().items()}
    if reduction is not None:
        tensors.update({f"reduction.{k}": t.contiguous() for k, t in reduction.state().items()})
    atomic_write(path / "bases.safetensors", save(tensors))


def write_meta(path: Path, meta: Dict[str, object]) -> None:
    """``meta.json`` of an entry, written last and atomically: it marks the entry complete."""
    atomic_write(path / "meta.json", json.dumps(meta, indent=1).encode())
