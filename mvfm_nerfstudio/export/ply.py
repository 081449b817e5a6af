"""PLY files (plyfile): feature point clouds and standard 3D Gaussian splatting files, plus the companion arrays.

* :func:`write_point_ply`: ``x y z`` (float), ``red green blue`` (uchar), optional int ``view row col`` /
  ``gaussian`` (where each point came from) and optional ``feature_0 .. feature_{D-1}`` (float).
* :func:`write_gaussian_ply`: the layout of the original 3D Gaussian Splatting code, which Nerfstudio's
  ``ns-export gaussian-splat`` writes and other 3DGS viewers open: float ``x y z nx ny nz f_dc_0..2
  f_rest_0.. opacity scale_0..2 rot_0..3``; ``f_dc`` the degree-0 SH coefficients, ``f_rest`` the higher ones
  channel-major (all of R, then G, then B), ``opacity`` a logit, ``scale`` log-scales, ``rot`` a ``wxyz``
  quaternion (unnormalised, as trained).
* :func:`write_features`: the ``[N, D]`` feature of vertex ``i`` in row ``i`` of a ``.npy`` (float16 or float32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from ..utils.io import atomic_path

__all__ = ["write_point_ply", "write_gaussian_ply", "write_features", "gaussian_ply_columns"]


def _write(path: Path, columns: Dict[str, np.ndarray], comments=()) -> None:
    from plyfile import PlyData, PlyElement

    n = len(next(iter(columns.values())))
    data = np.empty(n, dtype=[(k, v.dtype) for k, v in columns.items()])
    for k, v in columns.items():
        data[k] = v
    ply = PlyData([PlyElement.describe(data, "vertex")], text=False, byte_order="<", comments=list(comments))
    with atomic_path(path) as tmp:
        ply.write(str(tmp))


def write_point_ply(path: Path, positions: torch.Tensor, colors: torch.Tensor,
                    index: Optional[Dict[str, torch.Tensor]] = None, features: Optional[torch.Tensor] = None,
                    comments=()) -> None:
    """A point cloud: ``positions [N, 3]``, ``colors [N, 3]`` in [0, 1] (stored as uchar), optional int32 ``index``
    columns and ``features [N, D]`` as float properties ``feature_k``."""
    pos = positions.detach().float().cpu().numpy()
    rgb = np.round(colors.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    cols: Dict[str, np.ndarray] = {"x": pos[:, 0], "y": pos[:, 1], "z": pos[:, 2],
                                   "red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]}
    for name, values in (index or {}).items():
        cols[name] = values.cpu().numpy().astype(np.int32)
    if features is not None:
        f = features.detach().float().cpu().numpy()
        cols.update({f"feature_{k}": f[:, k] for k in range(f.shape[1])})
    _write(Path(path), cols, comments)


@torch.no_grad()
def gaussian_ply_columns(model, keep: torch.Tensor) -> Dict[str, np.ndarray]:
    """The standard 3DGS columns (module docstring) of the Gaussians ``keep [G]`` (bool or indices) of a
    splatfacto-style model, as Nerfstudio's ``ns-export gaussian-splat`` computes them."""
    keep = keep.to(model.means.device)

    def np32(x: torch.Tensor) -> np.ndarray:
        return x[keep].detach().float().cpu().numpy()

    means = np32(model.means)
    n = len(means)
    cols: Dict[str, np.ndarray] = {"x": means[:, 0], "y": means[:, 1], "z": means[:, 2]}
    cols.update({k: np.zeros(n, np.float32) for k in ("nx", "ny", "nz")})
    dc = np32(model.shs_0.reshape(model.num_points, 3))  # the degree-0 SH coefficients (RGB2SH for sh_degree 0)
    cols.update({f"f_dc_{i}": dc[:, i] for i in range(3)})
    if model.config.sh_degree > 0:
        rest = np32(model.shs_rest.transpose(1, 2).reshape(model.num_points, -1))  # channel-major, as the Inria code
        cols.update({f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])})
    cols["opacity"] = np32(model.opacities.reshape(-1))
    scales = np32(model.scales)
    cols.update({f"scale_{i}": scales[:, i] for i in range(3)})
    quats = np32(model.quats)
    cols.update({f"rot_{i}": quats[:, i] for i in range(4)})
    return cols


def write_gaussian_ply(path: Path, model, keep: torch.Tensor, comments=()) -> None:
    """Write the Gaussians ``keep`` of ``model`` as a standard 3DGS ``.ply`` (module docstring)."""
    _write(Path(path), gaussian_ply_columns(model, keep), comments)


def write_features(path: Path, features: torch.Tensor, dtype: str = "float16") -> None:
    """``features`` (``[N, D]``: row ``i`` = vertex ``i``; or any shape, e.g. a view's ``[H, W, D]``) -> ``.npy`` of
    ``dtype`` (``float16`` or ``float32``)."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"feature dtype must be 'float16' or 'float32', got {dtype!r}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, features.detach().float().cpu().numpy().astype(dtype))
