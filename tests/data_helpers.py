"""Shared helpers for the data-layer tests: one cached tiny procedural scene, small synthetic scenes."""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mvfm_nerfstudio.data.generator import make_scene, tiny_config

_TMP = Path(tempfile.mkdtemp(prefix="mvfm_data_tests_"))
atexit.register(shutil.rmtree, _TMP, True)


def tiny_scene_path(seed: int = 0) -> Path:
    """A tiny generated scene (8 views, 96x128, COLMAP tracks), made once per test session. Do not modify it."""
    # lru_cache keys f() and f(0) differently, so cache on the normalised seed only.
    return _tiny_scene_path(int(seed))


@functools.lru_cache(maxsize=None)
def _tiny_scene_path(seed: int) -> Path:
    return make_scene(tiny_config(seed=seed), _TMP / f"tiny_{seed}", progress=False)


def copy_scene(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_transforms(scene_dir: Path, fn) -> None:
    """Apply ``fn(meta)`` to the scene's transforms.json in place."""
    path = scene_dir / "transforms.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


def write_rgb(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def write_depth_png(path: Path, depth_m: np.ndarray, scale: float) -> None:
    """16-bit depth PNG; NaN -> 0 (invalid)."""
    raw = np.where(np.isfinite(depth_m), np.round(depth_m / scale), 0).astype(np.uint16)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(raw).save(path)


def translation_pose(x: float = 0.0, y: float = 0.0, z: float = 0.0, flip: bool = False) -> torch.Tensor:
    """OpenCV cam-to-world at (x, y, z) looking along +z (or -z with ``flip``)."""
    m = torch.eye(4, dtype=torch.float64)
    if flip:
        m[:3, :3] = torch.diag(torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))
    m[:3, 3] = torch.tensor([x, y, z], dtype=torch.float64)
    return m
