"""The feature cache on disk: content keys, entry layout, reading and writing.

An entry is a folder ``<cache_dir>/<scene>-<key>/`` holding

* ``features.npy``: float16 ``[N, h, w, D]``, read memory-mapped;
* ``bases.safetensors``: the display PCA basis (``display.*``) and, when features were reduced,
  the reduction basis (``reduction.*``);
* ``adapters.safetensors`` (only after per-scene adaptation);
* ``meta.json``: written last, atomically; its presence marks a complete entry. It records the
  files' sizes (``files``) and the blake2b of ``bases.safetensors``.

:func:`read_entry` verifies an entry before it is used (one mechanism for every consumer: ``mvfm-segment``,
``ns-train``, ``ns-viewer``): meta.json parses and names this key, the files exist with the recorded sizes,
``features.npy`` has the dtype and shape of the meta and exactly the bytes they need, the bases' checksum
matches, and the features are finite and not all zero (one chunked pass). An entry that does not verify
raises :class:`CacheEntryError`; :class:`~.store.FeatureStore` reports it by path, moves it aside
(:func:`quarantine_entry`) and recomputes it.

Scratch of an extraction (``.<entry>.partial-<pid>/`` and atomic writes' ``.<file>.<pid>.*.tmp``) is removed
by :func:`remove_stale_scratch` when its process is gone (a killed run).

The key hashes everything the features depend on (:func:`key_ingredients`): image file bytes,
image sizes, cameras, backbone, weights (file contents for weight/adapter files), seed and every
option that changes the features. Changing any of them makes a new entry; old ones stay on disk.
A published model (``adapters="Leoseg/dinov2_reg"``, a folder, a ``.pth``) is keyed by its files' bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from ..backbones.registry import get_backbone_spec
from ..backbones.vit import cached_fit3d_file, cached_pretrained_file, weights_options
from ..errors import WeightsUnavailableError
from ..features import PCABasis
from ..models.published import is_published_source, source_key
from ..utils.io import atomic_write
from .config import FeatureStoreConfig, ViewSource, default_cache_dir

__all__ = ["CACHE_FORMAT_VERSION", "CacheEntry", "CacheEntryError", "hash_file", "key_ingredients", "cache_key",
           "entry_path", "read_entry", "write_bases", "write_meta", "quarantine_entry", "remove_stale_scratch",
           "check_finite"]

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
    path = Path(weights).expanduser()
    if not path.is_file():  # the same message as building the backbone gives (the three weight options)
        raise WeightsUnavailableError(f"weights file {str(path)!r} for backbone {backbone!r} does not exist.\n"
                                      f"{weights_options(get_backbone_spec(backbone))}")
    return "file:" + hash_file(path)


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


class CacheEntryError(RuntimeError):
    """A cache entry is present but does not verify (truncated, missing or inconsistent files, non-finite values).

    Attributes:
        path: the entry folder.
        problem: what is wrong, naming the file.
    """

    def __init__(self, path: Path, problem: str):
        super().__init__(f"feature cache entry {path} is corrupt: {problem}")
        self.path, self.problem = Path(path), problem


_FEATURES, _BASES, _META = "features.npy", "bases.safetensors", "meta.json"


def _npy_layout(path: Path) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` from a ``.npy`` header (reads only the header)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = np.lib.format._read_array_header(f, version)  # public readers are per version
        return tuple(shape), dtype, f.tell()


def check_finite(path: Path, offset: int, shape: Tuple[int, ...], chunk_bytes: int = 8 << 20) -> None:
    """Raise ValueError naming ``path`` if its float16 ``shape`` array (data at byte ``offset``) holds NaN/inf or only
    zeros. One pass with plain reads in chunks: memory stays bounded and no pages stay mapped into the process."""
    per_view = int(np.prod(shape[1:])) * 2
    nonzero = False
    with open(path, "rb") as f:
        f.seek(offset)
        done = 0
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            values = np.frombuffer(block, dtype=np.float16)
            finite = np.isfinite(values)
            if not finite.all():
                first = done + 2 * int(np.argmin(finite))
                raise ValueError(f"{path} holds non-finite values (NaN/inf), first in view {first // per_view}")
            nonzero = nonzero or bool(values.any())
            done += len(block)
    if not nonzero:
        raise ValueError(f"{path} holds only zeros")


def read_entry(path: Path, num_images: int, grid: Tuple[int, int]) -> Optional[CacheEntry]:
    """The verified entry at ``path``; None when there is none (no ``meta.json``: absent or never finished).

    Raises:
        CacheEntryError: the entry is there but does not verify (see the module docstring).
    """
    from safetensors.torch import load

    path = Path(path)
    meta_path = path / _META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheEntryError(path, f"{meta_path} is not valid JSON ({err})") from None
    if meta.get("key") != path.name.rsplit("-", 1)[-1]:
        raise CacheEntryError(path, f"{meta_path} names key {meta.get('key')!r}, not this entry's")
    for name, size in (meta.get("files") or {}).items():  # sizes recorded at write time (older entries: none)
        f = path / name
        if not f.is_file():
            raise CacheEntryError(path, f"{f} is missing")
        if f.stat().st_size != size:
            raise CacheEntryError(path, f"{f} has {f.stat().st_size} bytes, expected {size}")
    feats_path, bases_path = path / _FEATURES, path / _BASES
    for f in (feats_path, bases_path):
        if not f.is_file():
            raise CacheEntryError(path, f"{f} is missing")
    h, w = grid
    try:
        shape, dtype, offset = _npy_layout(feats_path)
    except (ValueError, OSError, EOFError) as err:
        raise CacheEntryError(path, f"{feats_path} has no readable .npy header ({err})") from None
    expected = (num_images, h, w, int(meta.get("feature_dim", shape[-1] if shape else -1)))
    if shape != expected or dtype != np.float16:
        raise CacheEntryError(path, f"{feats_path} is {dtype} {list(shape)}, expected float16 {list(expected)}")
    need = offset + int(np.prod(shape)) * 2
    if feats_path.stat().st_size != need:
        raise CacheEntryError(path, f"{feats_path} has {feats_path.stat().st_size} bytes, its header needs {need}")
    blob = bases_path.read_bytes()
    digest = meta.get("bases_blake2b")
    if digest is not None and hashlib.blake2b(blob, digest_size=16).hexdigest() != digest:
        raise CacheEntryError(path, f"{bases_path} does not match its checksum in {meta_path}")
    try:
        bases = load(blob)
        display = PCABasis.from_state({k[len("display."):]: t for k, t in bases.items() if k.startswith("display.")})
        red = {k[len("reduction."):]: t for k, t in bases.items() if k.startswith("reduction.")}
        reduction = PCABasis.from_state(red) if red else None
    except Exception as err:  # safetensors raises its own types for damaged files
        raise CacheEntryError(path, f"{bases_path} is not a readable PCA basis ({type(err).__name__}: {err})") from None
    try:
        check_finite(feats_path, offset, shape)
    except ValueError as err:
        raise CacheEntryError(path, str(err)) from None
    return CacheEntry(np.load(feats_path, mmap_mode="r"), display, reduction, meta)


def quarantine_entry(path: Path) -> Path:
    """Move a corrupt entry aside to ``<entry>.corrupt-<UTC time>`` (kept for inspection; delete it at will)."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    k = 1
    while target.exists():
        target, k = target.with_name(f"{target.name.split('~')[0]}~{k}"), k + 1
    os.replace(path, target)
    return target


_PARTIAL = re.compile(r"^\..+\.partial-(\d+)$")
_TMP = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")  # utils.io.atomic_path: .<file>.<pid>.<random>.tmp
_LEGACY_TMP = re.compile(r"^\..+\.[^.]+\.tmp$")  # written before the pid was in the name: stale after a day
_LEGACY_AGE_S = 24 * 3600


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_scratch(root: Path) -> list:
    """Remove extraction scratch left by processes that no longer run, in the cache folder ``root`` and its entries.

    Scratch is recognised by name: ``.<entry>.partial-<pid>/`` folders and ``.<file>.<pid>.<random>.tmp`` files;
    only those whose ``<pid>`` is not a running process on this machine are removed, and temporary files of the
    older, pid-less form ``.<file>.<random>.tmp`` once a day old. Returns the removed paths.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    candidates = list(root.iterdir())
    candidates += [p for d in candidates if d.is_dir() and not d.name.startswith(".") for p in d.iterdir()]
    now = time.time()
    for p in candidates:
        m = (_PARTIAL.match(p.name) if p.is_dir() else None) or (_TMP.match(p.name) if p.is_file() else None)
        if m is not None:
            if _pid_alive(int(m.group(1))):
                continue
        elif not (p.is_file() and _LEGACY_TMP.match(p.name) and now - p.stat().st_mtime > _LEGACY_AGE_S):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def write_bases(path: Path, display: PCABasis, reduction: Optional[PCABasis]) -> None:
    """``bases.safetensors`` of an entry (atomic)."""
    from safetensors.torch import save

    tensors = {f"display.{k}": t.contiguous() for k, t in display.state().items()}
    if reduction is not None:
        tensors.update({f"reduction.{k}": t.contiguous() for k, t in reduction.state().items()})
    atomic_write(path / "bases.safetensors", save(tensors))


def write_meta(path: Path, meta: Dict[str, object]) -> None:
    """``meta.json`` of an entry, written last and atomically: it marks the entry complete. Adds what
    :func:`read_entry` verifies: every file's size (``files``) and the checksum of the (small) bases file."""
    files = {p.name: p.stat().st_size for p in sorted(Path(path).iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name != _META}
    meta = {**meta, "files": files,
            "bases_blake2b": hashlib.blake2b((path / _BASES).read_bytes(), digest_size=16).hexdigest()}
    atomic_write(path / _META, json.dumps(meta, indent=1).encode())
