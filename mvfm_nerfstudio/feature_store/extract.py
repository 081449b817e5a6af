"""Computing a cache entry: the MVFM run over multi-view sets of the training views.

:func:`compute_entry` does, in order (scratch files live in a ``.<entry>.partial-<pid>`` folder
beside the entry and are removed afterwards):

1. groups the views into sets (:func:`~mvfm_nerfstudio.data.sampling.group_views`) and starts a loader
   thread (:class:`ImageLoader`) that resizes the images to the MVFM input size ``(h*p, w*p)`` with
   exactly scaled intrinsics, into a uint8 memory map, in the order the sets need them; meanwhile
   the model is built (:func:`~mvfm_nerfstudio.models.build.build_model`) and the first sets run
   while later images are still loading;
2. optionally adapts the adapters to the scene (:func:`~mvfm_nerfstudio.training.adapt_to_scene`);
3. runs the sets and averages a view's features over the sets it is in, in float32, in the fixed
   order of the sets (:func:`run_sets`, deterministic), into a float32 memory map (RAM stays bounded
   by one pass's activations, whatever the number of views);
4. optionally PCA-reduces the features to ``feature_dim`` channels (fitted on a fixed subsample), fits
   the display basis and writes the entry (:func:`write_features`, then the bases and ``meta.json`` last).

**Sharded** (inside a ``torch.distributed`` job, e.g. ``torchrun --nproc-per-node K mvfm-extract``): the
batches of sets are dealt round-robin to the K processes; each runs its own and writes the outputs to a
shard in its scratch folder; rank 0 reads the shards back in the single-process order of the sets,
averages, reduces and writes the one entry. Every batch is the same forward pass as in one process, so
the entry is the same (bit-identical on the same device and thread count, ``tests/test_sharded_extraction.py``).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from ..data.sampling import group_views
from ..data.scene import resize_image
from ..features import PCABasis, fit_pca
from ..geometry.cameras import scale_intrinsics
from ..models.build import build_model, spec_patch_size
from ..training.adapt import adapt_to_scene
from ..utils.io import atomic_path
from ..utils.progress import make_progress
from ..utils.runtime import compute_precision
from .cache import CACHE_FORMAT_VERSION, write_bases, write_meta
from .config import FeatureStoreConfig, ViewSource

__all__ = ["ExtractionStats", "ImageLoader", "compute_entry", "load_resized", "run_sets", "write_features",
           "PCA_FIT_SAMPLES"]

PCA_FIT_SAMPLES = 50_000
"""Feature vectors (a deterministic subsample) the reduction and display PCA bases are fitted to."""

Size = Tuple[int, int]
Batch = Sequence[Tuple[int, ...]]


@dataclass
class ExtractionStats:
    """Where the time of one :func:`compute_entry` went (seconds of wall time in this process)."""

    forwards: int = 0
    """MVFM forward passes run by this process."""
    seconds: float = 0.0
    """The whole call."""
    forward_seconds: float = 0.0
    """Inside the network (inputs to the device, forward, outputs back to the host)."""
    load_wait_seconds: float = 0.0
    """Waiting for the loader thread (image decoding and resizing not hidden behind the forward)."""
    write_seconds: float = 0.0
    """Merging shards, PCA fitting, reduction and writing the entry."""
    build_seconds: float = 0.0
    """Building the model (and per-scene adaptation), overlapped with image loading."""
    world_size: int = 1
    """Processes the sets were dealt to."""
    sets_run: List[int] = field(default_factory=list)
    """Indices (into the entry's ``view_sets``) of the sets this process ran."""

    @property
    def overhead(self) -> float:
        """Fraction of :attr:`seconds` spent outside the forward passes."""
        return 1.0 - self.forward_seconds / self.seconds if self.seconds > 0 else 0.0


def load_resized(views: ViewSource, i: int, size: Size) -> Tuple[torch.Tensor, torch.Tensor]:
    """Image ``i`` resized to ``size`` -> (``[3, H', W']`` float in [0, 1], scaled ``[3, 3]`` intrinsics)."""
    img = views.load_image(i)
    if img.dtype == torch.uint8:
        img = img.float() / 255.0
    img = img[..., :3].float()
    hh, ww = (int(x) for x in views.image_sizes[i])
    if tuple(img.shape[:2]) != (hh, ww):
        raise ValueError(
            f"image {views.image_paths[i]} loaded as {tuple(img.shape[:2])} (HxW) but its camera says {(hh, ww)}"
        )
    x = resize_image(img.permute(2, 0, 1), size, "bilinear")
    return x.clamp(0, 1), scale_intrinsics(views.intrinsics[i].double(), (hh, ww), size).float()


class ImageLoader:
    """Fills a uint8 ``[N, 3, H', W']`` memory map with the resized images in a background thread.

    Args:
        views: the views.
        order: view indices in the order they are needed (each once; views not listed are never loaded).
        size: the MVFM input size ``(H', W')``.
        work: scratch folder for ``images.npy``.

    :meth:`wait` blocks until given views are in; ``intrinsics`` ``[N, 3, 3]`` (scaled to ``size``) is filled
    as they come. An error in the thread is raised again by :meth:`wait`.
    """

    def __init__(self, views: ViewSource, order: Sequence[int], size: Size, work: Path):
        n = len(views)
        self.views, self.order, self.size = views, list(order), size
        self.images = np.lib.format.open_memmap(work / "images.npy", "w+", np.uint8, (n, 3, *size))
        self.intrinsics = torch.zeros(n, 3, 3)
        self._position = {v: p for p, v in enumerate(self.order)}
        self._loaded = 0  # views of self.order that are in
        self._error: Optional[BaseException] = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mvfm-image-loader", daemon=True)

    def __enter__(self) -> "ImageLoader":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._stop = True
        self._thread.join()

    def _run(self) -> None:
        try:
            for i in self.order:
                with self._cond:
                    if self._stop:
                        return
                img, k = load_resized(self.views, i, self.size)
                self.images[i] = (img * 255).round().to(torch.uint8).numpy()
                self.intrinsics[i] = k
                with self._cond:
                    self._loaded += 1
                    self._cond.notify_all()
        except BaseException as err:  # handed to the main thread by wait()
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def wait(self, view_ids: Sequence[int]) -> float:
        """Block until ``view_ids`` are loaded; returns the seconds waited."""
        need = 1 + max(self._position[int(v)] for v in view_ids)
        t0 = time.perf_counter()
        with self._cond:
            while self._loaded < need and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
        return time.perf_counter() - t0


def run_sets(model, batches: Sequence[Batch], loader: ImageLoader, cam_to_world: torch.Tensor, sink,
             multi_view: bool, device: torch.device, progress, stats: ExtractionStats, bf16: bool = False) -> None:
    """Run the model over ``batches`` of sets; ``sink(batch_index, out)`` receives each ``[B, S, h, w, D]``
    float32 numpy output. Timings go to ``stats``."""
    size = loader.size
    total = sum(len(b) for b in batches)
    task = progress.add_task(f"MVFM: {total} sets of {len(batches[0][0]) if batches else 0} views", total=total,
                             info="")
    for j, batch in enumerate(batches):
        idx = torch.tensor(batch)  # [B, S]
        stats.load_wait_seconds += loader.wait(idx.flatten().tolist())
        t0 = time.perf_counter()
        x = torch.from_numpy(loader.images[idx.flatten().numpy()]).float().div(255).to(device)
        x = x.view(*idx.shape, 3, *size)
        with torch.inference_mode(), compute_precision(device, bf16):
            if multi_view:
                out = model(x, loader.intrinsics[idx].to(device), cam_to_world[idx].float().to(device))
            else:
                out = model.forward_base(x)
        out = out.float().permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, S, h, w, D]
        stats.forward_seconds += time.perf_counter() - t0
        stats.forwards += 1
        sink(j, out)
        progress.advance(task, len(batch))


def _accumulate(acc: np.ndarray, counts: np.ndarray, batch: Batch, out: np.ndarray) -> None:
    for b, s_idx in enumerate(batch):
        for s, view in enumerate(s_idx):
            acc[view] += out[b, s]
            counts[view] += 1


def sample_rows(arr: np.ndarray, seed: int) -> torch.Tensor:
    """A deterministic subsample of the ``[N, h, w, D]`` array's feature vectors, ``[M, D]`` float32."""
    flat = arr.reshape(-1, arr.shape[-1])
    total = flat.shape[0]
    if total <= PCA_FIT_SAMPLES:
        return torch.from_numpy(np.asarray(flat, dtype=np.float32))
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(total, generator=g)[:PCA_FIT_SAMPLES].sort().values.numpy()
    return torch.from_numpy(np.asarray(flat[rows], dtype=np.float32))


def write_features(acc: np.ndarray, path: Path, feature_dim: Optional[int], seed: int
                   ) -> Tuple[PCABasis, Optional[PCABasis], int]:
    """Write ``features.npy`` (float16, PCA-reduced to ``feature_dim`` when smaller than D) atomically.

    Returns:
        ``(display basis, reduction basis or None, channels written)``.
    """
    n, h, w, d_full = acc.shape
    reduction = None
    if feature_dim is not None and feature_dim < d_full:
        reduction = fit_pca(sample_rows(acc, seed), feature_dim, seed=seed)
    d_out = reduction.components.shape[0] if reduction is not None else d_full
    with atomic_path(path / "features.npy") as tmp:
        out = np.lib.format.open_memmap(tmp, "w+", np.float16, (n, h, w, d_out))
        step = max(1, (1 << 24) // max(1, h * w * d_full * 4))  # ~16 MB of float32 per block
        for i in range(0, n, step):
            f = torch.from_numpy(np.asarray(acc[i : i + step]))
            out[i : i + step] = (reduction.project(f) if reduction is not None else f).numpy().astype(np.float16)
        out.flush()
        display = fit_pca(sample_rows(out, seed), 3, seed=seed)
        del out
    return display, reduction, d_out


def _adapt(model, config: FeatureStoreConfig, views: ViewSource, work: Path, image_long_side: int,
           device: torch.device):
    """Per-scene adaptation of ``model``'s adapters in place; returns the model and the checkpoint it wrote.

    Trains on the scene folder's own views and correspondences (SfM tracks when the folder has a COLMAP
    model, else depth maps), at the feature store's input resolution and set size.
    """
    if views.scene_root is None:
        raise ValueError("per-scene adaptation (adapt=True) needs the scene directory (ViewSource.scene_root)")
    ckpt = adapt_to_scene(
        str(views.scene_root), model=model, steps=config.adapt_steps, output_dir=work / "adapt", lr=config.adapt_lr,
        weights=config.weights, model_seed=config.model_seed, seed=config.model_seed, image_size=image_long_side,
        num_views=config.views_per_set, device=str(device), tensorboard=False, single_process=True,
    )
    return model.eval(), Path(ckpt)


def _process_group() -> Tuple[int, int]:
    """``(rank, world size)`` of the current ``torch.distributed`` job, ``(0, 1)`` outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def compute_entry(config: FeatureStoreConfig, views: ViewSource, grid: Size, device: torch.device, path: Path,
                  key: str, ingredients: Dict[str, object]) -> ExtractionStats:
    """Compute and write the cache entry ``path`` (see the module docstring).

    Inside a ``torch.distributed`` job every rank must call it (the sets are sharded); rank 0 writes the entry.
    With per-scene adaptation (``config.adapt``) rank 0 computes alone and the other ranks return at once.

    Returns:
        This process's :class:`ExtractionStats`.
    """
    t_start = time.perf_counter()
    rank, world = _process_group()
    if world > 1 and config.adapt:
        if rank != 0:
            return ExtractionStats(world_size=world)
        print("MVFM extraction: per-scene adaptation runs on rank 0 alone, so rank 0 extracts alone", flush=True)
        world = 1
    stats = ExtractionStats(world_size=world)
    n, (h, w) = len(views), grid
    c2w = views.cam_to_world.double()
    if config.multi_view:
        sets: List[Tuple[int, ...]] = group_views(c2w, config.views_per_set, config.view_grouping,
                                                  config.max_views_per_pass)
    else:
        sets = [(i,) for i in range(n)]
    spb = config.sets_per_batch
    batches = [sets[j : j + spb] for j in range(0, len(sets), spb)]
    mine = list(range(len(batches)))[rank::world]  # round-robin: chunks are of about equal size
    stats.sets_run = [j * spb + k for j in mine for k in range(len(batches[j]))]
    order = list(dict.fromkeys(v for j in mine for s in batches[j] for v in s))  # views in the order needed
    patch = spec_patch_size(config)
    size = (h * patch, w * patch)
    work = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with ImageLoader(views, order, size, work) as loader, make_progress() as progress:
            t0 = time.perf_counter()
            model = build_model(config, default_device=device, text_space=config.text_space,
                                **config.attention_options())
            if model.patch_size != patch:
                raise RuntimeError(f"model patch size {model.patch_size} != {patch} predicted from its spec")
            adapted = None
            if config.adapt:
                model, adapted = _adapt(model, config, views, work, max(size), device)
            stats.build_seconds = time.perf_counter() - t0
            d_full = model.feature_dim
            if world == 1:
                # float32 sums in a memory-mapped scratch file: RAM stays bounded
                acc = np.lib.format.open_memmap(work / "sum.npy", "w+", np.float32, (n, h, w, d_full))
                counts = np.zeros(n, dtype=np.int64)
                sink = lambda j, out: _accumulate(acc, counts, batches[j], out)  # noqa: E731
            else:
                offsets: Dict[int, int] = {}  # batch index -> its first row in this shard
                rows = 0
                for j in mine:
                    offsets[j] = rows
                    rows += sum(len(s) for s in batches[j])
                shard = np.lib.format.open_memmap(work / "shard.npy", "w+", np.float32, (max(rows, 1), h, w, d_full))

                def sink(j, out):
                    shard[offsets[j] : offsets[j] + out.shape[0] * out.shape[1]] = out.reshape(-1, h, w, d_full)

            run_sets(model, [batches[j] for j in mine], loader, c2w, lambda k, out: sink(mine[k], out),
                     config.multi_view, device, progress, stats, config.bf16)
        t0 = time.perf_counter()
        if world > 1:
            shard.flush()
            del shard
            gathered: List[Optional[Tuple[str, Dict[int, int]]]] = [None] * world
            dist.all_gather_object(gathered, (str(work / "shard.npy"), offsets))
            if rank == 0:
                acc = np.lib.format.open_memmap(work / "sum.npy", "w+", np.float32, (n, h, w, d_full))
                counts = np.zeros(n, dtype=np.int64)
                shards = [(np.load(p, mmap_mode="r"), offs) for p, offs in gathered]
                owner = {j: r for r, (_, offs) in enumerate(shards) for j in offs}
                for j, batch in enumerate(batches):  # the single-process order
                    arr, offs = shards[owner[j]]
                    rows = sum(len(s) for s in batch)
                    out = np.asarray(arr[offs[j] : offs[j] + rows]).reshape(len(batch), len(batch[0]), h, w, d_full)
                    _accumulate(acc, counts, batch, out)
                del shards
        if rank == 0:
            for i in np.flatnonzero(counts > 1):  # views in several sets; x / 1 would be a pass over all for nothing
                acc[i] /= counts[i]
            path.mkdir(parents=True, exist_ok=True)
            display, reduction, d_out = write_features(acc, path, config.feature_dim, config.model_seed)
            write_bases(path, display, reduction)
            if adapted is not None:
                with atomic_path(path / "adapters.safetensors") as tmp:
                    shutil.copyfile(adapted, tmp)
            write_meta(path, {
                "key": key,
                "format": CACHE_FORMAT_VERSION,
                "num_images": n,
                "grid": [h, w],
                "feature_dim": d_out,
                "backbone_feature_dim": d_full,
                "mvfm_input_size": list(size),
                "view_sets": [list(s) for s in sets],
                "image_names": [Path(p).name for p in views.image_paths],
                "ingredients": ingredients,
            })
        if world > 1:
            dist.barrier()  # rank 0 has read every shard: the scratch folders may go
        stats.write_seconds = time.perf_counter() - t0
        stats.seconds = time.perf_counter() - t_start
        return stats
    finally:
        shutil.rmtree(work, ignore_errors=True)
