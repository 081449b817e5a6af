"""The one functional entry point, :func:`rasterize`: gsplat's CUDA rasteriser or the PyTorch path.

Also :func:`sh_colors` (view-dependent colours from spherical harmonics, as gsplat evaluates them) and
:func:`resolve_backend`, which picks the backend once per model: gsplat 1.4 ships no prebuilt CUDA kernels
and compiles them on first use (minutes, and it needs ``nvcc``); without ``nvcc`` its kernels are missing and
every gsplat call fails. ``"auto"`` then falls back to the PyTorch rasteriser with a one-line warning.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Dict, Literal, Optional, Tuple

import torch
from torch import Tensor

from .composite import composite_tiles
from .projection import project_gaussians

__all__ = ["Backend", "GSPLAT_FIX", "gsplat_cuda_status", "resolve_backend", "rasterize", "sh_colors"]

Backend = Literal["auto", "gsplat", "torch"]

GSPLAT_FIX = (
    "gsplat 1.4 compiles its CUDA kernels on first use: put the CUDA toolkit's nvcc on PATH (matching torch's CUDA "
    "version) and run again (the first run compiles for several minutes, later runs reuse the build in "
    "~/.cache/torch_extensions), or use the PyTorch rasteriser (--pipeline.model.rasterizer torch)"
)


@functools.lru_cache(maxsize=1)
def gsplat_cuda_status() -> Tuple[bool, str]:
    """``(usable, why not)`` for gsplat's CUDA kernels. Imports gsplat's backend, which compiles the kernels
    the first time when ``nvcc`` is present; call it only where CUDA is available."""
    try:
        from gsplat.cuda._backend import _C
    except Exception as err:  # a failed JIT build raises from inside torch.utils.cpp_extension
        return False, f"building gsplat's CUDA kernels failed ({type(err).__name__}: {err})"
    if _C is None:
        return False, "gsplat's CUDA kernels are not built (no CUDA toolkit / nvcc found)"
    return True, ""


def resolve_backend(requested: str, device: torch.device,
                    probe: Callable[[], Tuple[bool, str]] = gsplat_cuda_status) -> str:
    """The backend to use on ``device``: ``"gsplat"`` or ``"torch"``.

    ``"auto"``: gsplat on CUDA when its kernels work, else the PyTorch rasteriser (with a one-line warning on
    CUDA). ``"gsplat"`` on a device or machine where it cannot run raises a ``RuntimeError`` naming the fix.
    """
    if requested not in ("auto", "gsplat", "torch"):
        raise ValueError(f"unknown rasterizer {requested!r}; use 'auto', 'gsplat' or 'torch'")
    if requested == "torch" or (requested == "auto" and device.type != "cuda"):
        return "torch"
    if device.type != "cuda":
        raise RuntimeError(f"rasterizer='gsplat' needs a CUDA device (gsplat's rasteriser is CUDA-only), got "
                           f"{device}; use 'auto' or 'torch'")
    usable, why = probe()
    if usable:
        return "gsplat"
    if requested == "gsplat":
        raise RuntimeError(f"rasterizer='gsplat': {why}. Fix: {GSPLAT_FIX}")
    warnings.warn(f"{why}: using the PyTorch rasteriser on {device} (slower). Fix: {GSPLAT_FIX}", stacklevel=2)
    return "torch"


def sh_colors(sh: Tensor, means: Tensor, viewmat: Tensor, degree: int, backend: str = "torch") -> Tensor:
    """RGB from spherical-harmonic coefficients seen from a camera, as gsplat's rasterization.

    Args:
        sh: ``[N, K, 3]`` coefficients. means: ``[N, 3]``. viewmat: ``[4, 4]`` world-to-camera.
        degree: SH degree to use (``(degree + 1)² <= K``).
        backend: ``"gsplat"`` (its CUDA kernel; CUDA tensors) or ``"torch"`` (gsplat's PyTorch reference, any
            device), as chosen by :func:`resolve_backend` for the rasteriser.
    Returns:
        ``[N, 3]`` colours ``max(SH(dir) + 0.5, 0)``.
    """
    from gsplat.cuda._torch_impl import _spherical_harmonics

    cam_center = -viewmat[:3, :3].T @ viewmat[:3, 3]
    dirs = means - cam_center
    if backend == "gsplat":
        from gsplat import spherical_harmonics

        rgb = spherical_harmonics(degree, dirs, sh)
    else:
        rgb = _spherical_harmonics(degree, dirs, sh)
    return torch.clamp_min(rgb + 0.5, 0.0)


def rasterize(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    antialiased: bool = False,
    render_depth: bool = False,
    background: Optional[Tensor] = None,
    tile_size: int = 16,
    block_size: int = 8,
    max_per_block: Optional[int] = None,
    max_per_pixel: Optional[int] = 256,
    absgrad: bool = False,
    backend: Backend = "auto",
) -> Tuple[Tensor, Tensor, Dict[str, Any]]:
    """Render ``colors`` (any channels: RGB, features, both concatenated) of 3D Gaussians.

    Args:
        means: ``[N, 3]`` world positions. quats: ``[N, 4]`` (w, x, y, z), any norm.
        scales: ``[N, 3]`` activated scales. opacities: ``[N]`` activated, in [0, 1].
        colors: ``[N, C]`` values to composite.
        viewmat: ``[4, 4]`` world-to-camera, OpenCV frame. K: ``[3, 3]`` in pixels.
        width, height: output size in pixels.
        near_plane, far_plane, eps2d, radius_clip: projection settings (gsplat's meanings).
        antialiased: gsplat's ``rasterize_mode="antialiased"`` (opacity compensation).
        render_depth: append expected z-depth as a last channel (``C + 1`` channels).
        background: ``[C]`` colour composited behind (depth channel gets 0), or None.
        tile_size: tile size in pixels (16 as gsplat; also defines the support).
        block_size, max_per_block, max_per_pixel: torch backend: binning block size and front-K
            truncations per block / per pixel (None: exact); see :func:`composite_tiles`.
        absgrad: fill ``meta["means2d"].absgrad`` in backward (for AbsGS densification).
        backend: ``"auto"`` (:func:`resolve_backend` for the tensors' device), ``"gsplat"`` or ``"torch"``.

    Returns:
        ``render [H, W, C(+1)]``, ``alpha [H, W, 1]`` and ``meta``: gsplat-compatible info for
        densification (``means2d [1, N, 2]``, ``radii [1, N]``, ``depths [1, N]``, ``conics``,
        ``opacities``, ``width``, ``height``, ``n_cameras=1``, ``gaussian_ids=None``,
        ``tile_size``) plus ``backend`` and, for torch, the truncation stats of :func:`composite_tiles`.
    """
    if backend == "auto":
        backend = resolve_backend("auto", means.device)
    if colors.ndim != 2 or colors.shape[0] != means.shape[0]:
        raise ValueError(f"rasterize: colors must be [N, C] with N={means.shape[0]}, got {list(colors.shape)}")
    if background is not None and background.shape != (colors.shape[1],):
        raise ValueError(f"rasterize: background must be [{colors.shape[1]}], got {list(background.shape)}")
    if backend == "gsplat":
        return _rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height, near_plane,
                                 far_plane, eps2d, radius_clip, antialiased, render_depth, background, tile_size,
                                 absgrad)
    if backend != "torch":
        raise ValueError(f"rasterize: unknown backend {backend!r}; use 'auto', 'gsplat' or 'torch'")

    proj = project_gaussians(means, quats, scales, opacities, viewmat, K, width, height, near_plane, far_plane,
                             eps2d, radius_clip, antialiased)
    if render_depth:
        colors = torch.cat([colors, proj.depths[:, None]], dim=-1)
        if background is not None:
            background = torch.cat([background, background.new_zeros(1)])
    render, alpha, stats = composite_tiles(proj, colors, width, height, tile_size, block_size, max_per_block,
                                           max_per_pixel, background, absgrad)
    if render_depth:
        render = torch.cat([render[..., :-1], render[..., -1:] / alpha.clamp_min(1e-10)], dim=-1)
    meta = {
        "backend": "torch", "means2d": proj.means2d, "radii": proj.radii[None], "depths": proj.depths[None],
        "conics": proj.conics[None], "opacities": proj.opacities[None], "width": width, "height": height,
        "n_cameras": 1, "gaussian_ids": None, "camera_ids": None, "tile_size": tile_size, **stats,
    }
    return render, alpha, meta


def _rasterize_gsplat(means, quats, scales, opacities, colors, viewmat, K, width, height, near_plane, far_plane,
                      eps2d, radius_clip, antialiased, render_depth, background, tile_size, absgrad):
    if not means.is_cuda:
        raise RuntimeError("rasterize: backend='gsplat' needs CUDA tensors (gsplat's rasteriser is CUDA-only); "
                           "use backend='torch' or 'auto' on CPU")
    from gsplat import rasterization

    render, alpha, meta = rasterization(
        means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmat[None],
        Ks=K[None], width=width, height=height, near_plane=near_plane, far_plane=far_plane, radius_clip=radius_clip,
        eps2d=eps2d, packed=False, tile_size=tile_size, backgrounds=None if background is None else background[None],
        render_mode="RGB+ED" if render_depth else "RGB", absgrad=absgrad,
        rasterize_mode="antialiased" if antialiased else "classic",
    )
    meta["backend"] = "gsplat"
    return render[0], alpha[0], meta
