""":class:`FeatureStore`: per-image MVFM feature maps of the training views, computed once and cached on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..features import PCABasis
from ..geometry.feature_grid import bilinear_taps, grid_for_long_side
from ..models.build import fixed_feature_grid
from ..utils.runtime import DeviceLike, resolve_device
from .cache import (CacheEntry, CacheEntryError, cache_key, entry_path, key_ingredients, quarantine_entry, read_entry,
                    remove_stale_scratch)
from .config import FeatureStoreConfig, ViewSource
from .extract import ExtractionStats, compute_entry

__all__ = ["FeatureStore", "describe"]


class FeatureStore:
    """Per-image MVFM feature maps for the training views, computed once and cached on disk.

    Args:
        config: extraction options.
        views: the training views.
        device: what ``config.device == "auto"`` means (e.g. the Nerfstudio trainer's device); None = CUDA when
            available, else the CPU.

    Call :meth:`prepare` (loads or computes), then :meth:`feature_map` / :meth:`sample`.
    After :meth:`prepare`: ``cache_hit`` (bool), ``mvfm_forwards`` (MVFM forward passes
    run by this store; 0 on a cache hit), ``path`` (the cache entry), ``grid`` ``(h, w)``,
    ``feature_dim`` D, ``display_basis`` (3-component :class:`PCABasis` of the cached
    features, for fixed-colour renders) and ``reduction_basis`` (the PCA to D dims, or None).

    Pixel mapping: each image's ``[h, w]`` feature map spans the whole image
    (:mod:`mvfm_nerfstudio.geometry.feature_grid`): cell ``(i, j)`` is centred at pixel
    ``((j + 0.5) W / w, (i + 0.5) H / h)`` of an ``H x W`` image.
    """

    def __init__(self, config: FeatureStoreConfig, views: ViewSource, device: Optional[DeviceLike] = None):
        self.config = config
        self.views = views
        self.device = resolve_device(config.device, default=device)
        self.cache_hit = False
        self.mvfm_forwards = 0
        self.path: Optional[Path] = None
        self.features: Optional[np.ndarray] = None
        self.meta: Dict[str, object] = {}
        self.display_basis: Optional[PCABasis] = None
        self.reduction_basis: Optional[PCABasis] = None
        self._key: Optional[str] = None
        self._ingredients: Dict[str, object] = {}
        self.extraction: Optional[ExtractionStats] = None  # timings of this process's part of a computed entry
        self._resident: Optional[torch.Tensor] = None  # [N*h*w, D] float16 on a device (see keep_on)
        h0, w0 = (int(x) for x in views.image_sizes[0])
        # a model with a fixed (square) input, e.g. a published one, fixes the grid: feature_resolution then unused
        self.grid = fixed_feature_grid(config) or grid_for_long_side((h0, w0), config.feature_resolution)

    # ------------------------------------------------------------------ key
    def key_ingredients(self) -> Dict[str, object]:
        """Everything the cached features depend on (JSON-serialisable)."""
        return key_ingredients(self.config, self.views, self.grid)

    def cache_key(self) -> str:
        """Hash of :meth:`key_ingredients` (computed once per store: it reads every image file)."""
        if self._key is None:
            self._ingredients = self.key_ingredients()
            self._key = cache_key(self._ingredients)
        return self._key

    def entry_path(self) -> Path:
        return entry_path(self.config, self.views.scene_name, self.cache_key())

    # ------------------------------------------------------------------ load / compute
    def prepare(self) -> "FeatureStore":
        """Load the cache entry for the current key, computing it first if absent or corrupt.

        An entry that does not verify (:func:`~.cache.read_entry`) is reported by path, moved aside to
        ``<entry>.corrupt-<time>`` and recomputed; scratch of killed extractions in the cache folder is removed
        first (:func:`~.cache.remove_stale_scratch`). Inside a distributed job (``torch.distributed`` initialised:
        ``torchrun ... mvfm-extract``, a multi-GPU ``ns-train``) rank 0 does both and looks the entry up; on a miss
        every rank computes a share of the view sets and rank 0 writes the one entry (:mod:`.extract`); then every
        rank loads it.
        """
        from rich.console import Console

        console = Console(stderr=False)
        path = self.entry_path()
        self.path = path
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        hit = False
        if rank == 0:
            for stale in remove_stale_scratch(path.parent):
                console.print(f"MVFM feature cache: removed scratch of a killed extraction: {stale}", soft_wrap=True)
            hit = self._try_load(path, console)
        if distributed:
            flag = [hit]
            dist.broadcast_object_list(flag, src=0)
            hit = bool(flag[0])
        if hit:
            self.cache_hit = rank == 0
            if rank == 0:
                console.print(f"[bold]MVFM feature cache: hit[/bold] {path}")
        else:
            if rank == 0:
                shards = f" ({dist.get_world_size()} processes)" if distributed else ""
                console.print(f"[bold]MVFM feature cache: miss[/bold] -> computing {path}{shards}")
            self.extraction = compute_entry(self.config, self.views, self.grid, self.device, path, self.cache_key(),
                                            self._ingredients)
            self.mvfm_forwards += self.extraction.forwards
        if distributed:
            dist.barrier()
        if self.features is None:
            try:
                entry = read_entry(path, len(self.views), self.grid)
            except CacheEntryError as err:
                raise RuntimeError(
                    f"the feature cache entry just computed does not verify: {err.problem}. The model "
                    f"(backbone {self.config.backbone!r}, weights {self.config.weights!r}, adapters "
                    f"{self.config.adapters!r}) gives unusable features for these views"
                ) from None
            if entry is None:
                raise RuntimeError(f"feature cache entry {path} was written but cannot be read back")
            self._use(entry)
        return self

    def _try_load(self, path: Path, console) -> bool:
        """Load a verified entry; a corrupt one is reported, moved aside, and False returned (recompute)."""
        try:
            entry: Optional[CacheEntry] = read_entry(path, len(self.views), self.grid)
        except CacheEntryError as err:
            aside = quarantine_entry(path)
            console.print(f"[bold red]MVFM feature cache: corrupt entry[/bold red] {path}: {err.problem}\n"
                          f"  moved aside to {aside}; recomputing", soft_wrap=True, highlight=False)
            return False
        if entry is None:
            return False
        self._use(entry)
        return True

    def _use(self, entry: CacheEntry) -> None:
        self.features, self.meta = entry.features, entry.meta
        self.display_basis, self.reduction_basis = entry.display_basis, entry.reduction_basis

    # ------------------------------------------------------------------ access
    def _require(self) -> np.ndarray:
        if self.features is None:
            raise RuntimeError("FeatureStore.prepare() has not been called")
        return self.features

    @property
    def feature_dim(self) -> int:
        return int(self._require().shape[-1])

    def __len__(self) -> int:
        return len(self.views)

    def keep_on(self, device: torch.device, max_bytes: int = 2 << 30) -> bool:
        """Keep the float16 features on ``device`` (one copy; e.g. the training GPU) when they take at most
        ``max_bytes``; :meth:`sample` and :meth:`feature_map` then read from there with no host work per call.

        Returns:
            Whether the features are resident on ``device`` (False: they stay memory-mapped on disk).
        """
        feats = self._require()
        if feats.nbytes > max_bytes:
            return False
        self._resident = torch.from_numpy(np.array(feats)).reshape(-1, feats.shape[-1]).to(device)  # one copy
        return True

    def feature_map(self, i: int) -> torch.Tensor:
        """Feature map of view ``i``: ``[h, w, D]`` float32 (spans the whole image, see the class docstring); on the
        device given to :meth:`keep_on`, else on the CPU."""
        feats = self._require()
        if self._resident is not None:
            h, w, d = feats.shape[1:]
            return self._resident[i * h * w:(i + 1) * h * w].view(h, w, d).float()
        return torch.from_numpy(np.asarray(feats[i], dtype=np.float32))

    def sample(self, image_indices: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Bilinearly interpolated features at pixel coordinates (only the tapped cells are read from disk).

        Args:
            image_indices: ``[R]`` long view indices.
            xy: ``[R, 2]`` pixel coordinates ``(x, y)`` in each view's ``H x W`` image, pixel
                centres at ``(col + 0.5, row + 0.5)``.

        Returns:
            ``[R, D]`` float32, equal to :func:`~mvfm_nerfstudio.geometry.feature_grid.sample_map` of each view's
            map; on the device given to :meth:`keep_on` (one gather there), else on the CPU.
        """
        feats = self._require()
        n, h, w, d = feats.shape
        if self._resident is not None:
            device = self._resident.device
            idx = image_indices.long().to(device)
            sizes = self.views.image_sizes.to(device)[idx]
            cells, weights = bilinear_taps(xy.to(device), sizes, (h, w))
            vals = self._resident[(idx * (h * w) + cells).flatten()].view(4, -1, d).float()
            return (weights[..., None] * vals).sum(0)
        idx = image_indices.long().cpu()
        cells, weights = bilinear_taps(xy.cpu(), self.views.image_sizes[idx], (h, w))
        rows = idx * (h * w) + cells  # [4, R] rows of the flattened [N*h*w, D] array
        uniq, inverse = torch.unique(rows.flatten(), return_inverse=True)
        flat = feats.reshape(n * h * w, d)
        vals = torch.from_numpy(np.asarray(flat[uniq.numpy()], dtype=np.float32))[inverse].view(4, -1, d)
        return (weights[..., None] * vals).sum(0)

    def sample_pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """Features for Nerfstudio-style ray indices ``[R, 3]`` = (image, row, col) -> ``[R, D]`` (pixel centres)."""
        xy = torch.stack([indices[:, 2], indices[:, 1]], dim=-1).double() + 0.5
        return self.sample(indices[:, 0], xy)


def describe(store: FeatureStore) -> str:
    """One-line summary for logs."""
    h, w = store.grid
    state = "hit" if store.cache_hit else f"computed with {store.mvfm_forwards} MVFM passes"
    return f"{len(store)} views, {h}x{w} x {store.feature_dim} features ({state}) at {store.path}"
