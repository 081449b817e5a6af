"""Readers for the files of a posed scene: RGB images, depth maps and label maps.

Every reader raises :class:`~mvfm_nerfstudio.errors.SceneError` naming the file when it is
missing, truncated or of the wrong kind. Depth is z-depth along the optical axis in scene units
(``raw * scale``); 16-bit PNG values 0 and 65535 are invalid and become NaN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from ..errors import SceneError

__all__ = ["read_image", "read_image_size", "read_depth_file", "read_label_file", "read_normal_file"]

Size = Tuple[int, int]


def read_image_size(path: Path, decode: bool = False) -> Size:
    """``(H, W)`` of an image file from its header; :class:`SceneError` naming the file if unreadable. With
    ``decode`` the pixel data are decoded too (and dropped), which also finds truncated or corrupt data."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if decode:
                im.load()
    except FileNotFoundError:
        raise SceneError(f"image file {path} does not exist") from None
    except Exception as err:  # PIL raises several types for corrupt headers
        raise SceneError(f"image file {path} is not a readable image ({type(err).__name__}: {err})") from err
    return int(h), int(w)


def read_image(path: Path) -> torch.Tensor:
    """RGB image ``[3, H, W]`` float32 in [0, 1]; :class:`SceneError` naming the file if missing/corrupt."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise SceneError(f"image file {path} does not exist") from None
    except Exception as err:
        raise SceneError(f"image file {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _read_array(path: Path, what: str) -> np.ndarray:
    from PIL import Image

    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with Image.open(path) as im:
            return np.array(im)
    except FileNotFoundError:
        raise SceneError(f"{what} file {path} does not exist") from None
    except Exception as err:
        raise SceneError(f"{what} file {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err


def read_depth_file(path: Path, scale: float) -> torch.Tensor:
    """Depth map ``[H, W]`` float32 in scene units with NaN where invalid.

    16-bit PNGs (and integer ``.npy``) are raw units times ``scale``; 0 and 65535 are invalid.
    Float ``.npy`` files are multiplied by ``scale`` too; non-finite or non-positive are invalid.
    """
    raw = _read_array(path, "depth")
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise SceneError(f"depth file {path} must be a single-channel image, got shape {raw.shape}")
    if raw.dtype == np.uint8:
        raise SceneError(f"depth file {path} is 8-bit; depth must be 16-bit PNG (raw * depth_scale) or .npy")
    depth = raw.astype(np.float64)
    invalid = ~np.isfinite(depth) | (depth <= 0)
    if np.issubdtype(raw.dtype, np.integer):
        invalid |= raw == 65535
    depth = depth * scale
    depth[invalid] = np.nan
    return torch.from_numpy(depth.astype(np.float32))


def read_normal_file(path: Path) -> torch.Tensor:
    """Normal map ``[3, H, W]`` float32 from a ``.npy`` of shape ``[H, W, 3]`` (unit vectors, NaN = none).

    Vectors far from unit length (not normals, or a 0-255 image) are rejected; the rest are renormalised.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise SceneError(f"normal file {path} must be a .npy [H, W, 3] float array (got {path.suffix or 'no suffix'})")
    if not path.is_file():
        raise SceneError(f"normal file {path} does not exist")
    try:
        raw = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any read failure is a bad file
        raise SceneError(f"normal file {path} could not be read: {err}") from None
    if raw.ndim != 3 or raw.shape[-1] != 3 or not np.issubdtype(raw.dtype, np.floating):
        raise SceneError(f"normal file {path} must be a float [H, W, 3] array, got {raw.dtype} {raw.shape}")
    n = torch.from_numpy(raw.astype(np.float32)).permute(2, 0, 1).contiguous()
    length = n.norm(dim=0)
    finite = torch.isfinite(length)
    if finite.any() and ((length[finite] - 1).abs() > 0.01).any():
        raise SceneError(f"normal file {path} holds vectors that are not unit length (|n| up to "
                         f"{float(length[finite].max()):.3g}); expected unit normals with NaN where none")
    return n / length.clamp(min=1e-12)


def read_label_file(path: Path) -> torch.Tensor:
    """Integer label map ``[H, W]`` (int64), e.g. object ids with 0 = background."""
    raw = _read_array(path, "object-id")
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise SceneError(f"object-id file {path} must be a single-channel integer image, got {raw.dtype} {raw.shape}")
    return torch.from_numpy(raw.astype(np.int64))
