"""Computing a cache entry: the MVFM run over multi-view sets of the training views.

:func:`compute_entry` does, in order (scratch files live in a ``.<entry>.partial-<pid>`` folder
beside the entry and are removed afterwards):

1. builds the model (:func:`~mvfm_nerfstudio.models.build.build_model`) and groups the views into
   sets (:func:`~mvfm_nerfstudio.data.sampling.group_views`);
2. optionally adapts the adapters to the scene (:func:`~mvfm_nerfstudio.training.adapt_to_scene`);
3. resizes every image to the MVFM input size ``(h*p, w*p)`` with exactly scaled intrinsics
   (:func:`load_inputs`), into a uint8 memory map;
4. runs the sets and averages a view's features over the sets it is in, in float32, in the fixed
   order of the sets (:func:`run_sets`, deterministic);
5. optionally PCA-reduces the features to ``feature_dim`` channels, fits the display basis and writes
   the entry (:func:`write_features`, then the bases and ``meta.json`` last).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.sampling import group_views
from ..data.scene import resize_image
from ..features import PCABasis, fit_pca
from ..geometry.cameras import scale_intrinsics
from ..models.build import build_model
from ..training.adapt import adapt_to_scene
from ..utils.io import atomic_path
from ..utils.runtime import compute_precision
from .cache import CACHE_FORMAT_VERSION, write_bases, write_meta
from .config import FeatureStoreConfig, ViewSource

__all__ = ["compute_entry", "load_inputs", "run_sets", "write_features", "PCA_FIT_SAMPLES"]

PCA_FIT_SAMPLES = 50_000
"""Feature vectors (a deterministic subsample) the reduction and display PCA bases are fitted to."""

Size = Tuple[int, int]


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())


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


def load_inputs(views: ViewSource, size: Size, work: Path, progress) -> Tuple[np.ndarray, torch.Tensor]:
    """All images at the MVFM input size (uint8 ``[N, 3, H', W']`` memory map in ``work``) and their intrinsics."""
    n = len(views)
    images = np.lib.format.open_memmap(work / "images.npy", "w+", np.uint8, (n, 3, *size))
    intr = torch.empty(n, 3, 3)
    for i in progress.track(range(n), description="MVFM: loading images"):
        img, intr[i] = load_resized(views, i, size)
        images[i] = (img * 255).round().to(torch.uint8).numpy()
    return images, intr


def run_sets(model, sets: Sequence[Tuple[int, ...]], images: np.ndarray, intrinsics: torch.Tensor,
             cam_to_world: torch.Tensor, acc: np.ndarray, multi_view: bool, sets_per_batch: int,
             device: torch.device, progress, bf16: bool = False) -> int:
    """Run the model over ``sets`` and leave each view's mean feature map in ``acc`` ``[N, h, w, D]`` (float32).

    Returns:
        The number of forward passes.
    """
    counts = np.zeros(len(acc), dtype=np.int64)
    size = images.shape[-2:]
    task = progress.add_task(f"MVFM: {len(sets)} sets of {len(sets[0])} views", total=len(sets))
    forwards = 0
    for j in range(0, len(sets), sets_per_batch):
        batch = sets[j : j + sets_per_batch]
        idx = torch.tensor(batch)  # [B, S]
        x = torch.from_numpy(images[idx.flatten().numpy()]).float().div(255).to(device)
        x = x.view(*idx.shape, 3, *size)
        with torch.inference_mode(), compute_precision(device, bf16):
            if multi_view:
                out = model(x, intrinsics[idx].to(device), cam_to_world[idx].float().to(device))
            else:
                out = model.forward_base(x)
        forwards += 1
        out = out.float().permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, S, h, w, D]
        for b, s_idx in enumerate(batch):
            for s, view in enumerate(s_idx):
                acc[view] += out[b, s]
                counts[view] += 1
        progress.advance(task, len(batch))
    for i in range(len(acc)):
        acc[i] /= counts[i]
    return forwards


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
        for i in range(n):
            f = torch.from_numpy(np.asarray(acc[i]))
            out[i] = (reduction.project(f) if reduction is not None else f).numpy().astype(np.float16)
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


def compute_entry(config: FeatureStoreConfig, views: ViewSource, grid: Size, device: torch.device, path: Path,
                  key: str, ingredients: Dict[str, object]) -> int:
    """Compute and write the cache entry ``path`` (see the module docstring); returns the forward passes run."""
    n, (h, w) = len(views), grid
    model = build_model(config, default_device=device, text_space=config.text_space, **config.attention_options())
    size = (h * model.patch_size, w * model.patch_size)
    c2w = views.cam_to_world.double()
    if config.multi_view:
        sets: List[Tuple[int, ...]] = group_views(c2w, config.views_per_set, config.view_grouping,
                                                  config.max_views_per_pass)
    else:
        sets = [(i,) for i in range(n)]
    work = path.parent / f".{path.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        adapted = None
        if config.adapt:
            model, adapted = _adapt(model, config, views, work, max(size), device)
        # Resized inputs and float32 sums live in memory-mapped scratch files: RAM stays bounded.
        acc = np.lib.format.open_memmap(work / "sum.npy", "w+", np.float32, (n, h, w, model.feature_dim))
        with _progress() as progress:
            images, intr = load_inputs(views, size, work, progress)
            forwards = run_sets(model, sets, images, intr, c2w, acc, config.multi_view, config.sets_per_batch,
                                device, progress, config.bf16)
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
            "backbone_feature_dim": model.feature_dim,
            "mvfm_input_size": list(size),
            "view_sets": [list(s) for s in sets],
            "image_names": [Path(p).name for p in views.image_paths],
            "ingredients": ingredients,
        })
        return forwards
    finally:
        shutil.rmtree(work, ignore_errors=True)
