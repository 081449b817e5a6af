"""Projection of 3D Gaussians to one pinhole camera and their screen-space support (gsplat's conventions).

See :mod:`mvfm_nerfstudio.splatting` for the conventions (OpenCV world-to-camera ``viewmat``, ``K`` in
pixels, pixel centres at ``col + 0.5``, EWA splatting with gsplat's ``eps2d`` blur and tile binning).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import torch
from torch import Tensor

__all__ = ["ALPHA_MAX", "ALPHA_MIN", "T_MIN", "Projection", "project_gaussians", "tile_bounds", "block_bounds"]

ALPHA_MAX = 0.999
"""Upper clamp of a Gaussian's alpha at a pixel (gsplat)."""
ALPHA_MIN = 1.0 / 255.0
"""Gaussians with a smaller alpha at a pixel are skipped (gsplat)."""
T_MIN = 1e-4
"""Compositing stops before the transmittance would reach this value (gsplat)."""



class Projection(NamedTuple):
    """Screen-space Gaussians of one camera (outputs of :func:`project_gaussians`).

    Attributes:
        means2d: ``[1, N, 2]`` pixel coordinates of the projected means (non-leaf: call
            ``retain_grad()`` on it to read screen-space gradients, as the densification does).
        conics: ``[N, 3]`` upper triangle ``(a, b, c)`` of the inverse 2D covariance.
        depths: ``[N]`` camera-space z.
        radii: ``[N]`` int32 pixel radius; 0 for culled Gaussians.
        opacities: ``[N]`` opacities (times the antialiasing compensation if enabled).
    """

    means2d: Tensor
    conics: Tensor
    depths: Tensor
    radii: Tensor
    opacities: Tensor


def _check_inputs(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, viewmat: Tensor, K: Tensor) -> None:
    n = means.shape[0]
    expected = {"means": (means, (n, 3)), "quats": (quats, (n, 4)), "scales": (scales, (n, 3)),
                "opacities": (opacities, (n,)), "viewmat": (viewmat, (4, 4)), "K": (K, (3, 3))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"rasterize: {name} must have shape {list(shape)}, got {list(t.shape)}")


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    antialiased: bool = False,
) -> Projection:
    """Project 3D Gaussians to one pinhole camera with gsplat's PyTorch reference (CPU or GPU).

    Args:
        means: ``[N, 3]`` world positions. quats: ``[N, 4]`` (w, x, y, z), normalised here.
        scales: ``[N, 3]`` standard deviations (activated, not log). opacities: ``[N]`` in [0, 1].
        viewmat: ``[4, 4]`` world-to-camera, OpenCV. K: ``[3, 3]`` pixels.
        width, height: image size in pixels.
    """
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    _check_inputs(means, quats, scales, opacities, viewmat, K)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    radii, means2d, depths, conics, comp = _fully_fused_projection(
        means, covars, viewmat[None], K[None], width, height, eps2d=eps2d, near_plane=near_plane,
        far_plane=far_plane, calc_compensations=antialiased,
    )
    radii = radii[0]
    if radius_clip > 0:
        radii = torch.where(radii.float() <= radius_clip, torch.zeros_like(radii), radii)
    opac = opacities * comp[0] if antialiased else opacities
    return Projection(means2d, conics[0], depths[0], radii.to(torch.int32), opac)


def tile_bounds(means2d: Tensor, radii: Tensor, tile_size: int, tile_width: int, tile_height: int) -> Tuple[Tensor, Tensor]:
    """Tile rectangle each Gaussian overlaps, exactly as gsplat's ``isect_tiles``.

    Args:
        means2d: ``[N, 2]`` pixel coordinates. radii: ``[N]`` pixel radii (0 = culled).
    Returns:
        ``tile_min [N, 2]`` (inclusive) and ``tile_max [N, 2]`` (exclusive), (x, y) tile indices;
        empty (min == max) for culled Gaussians.
    """
    tile_m = means2d.detach() / tile_size  # the same float expressions as gsplat's kernel
    tile_r = (radii.to(tile_m.dtype) / tile_size)[:, None]
    upper = torch.tensor([tile_width, tile_height], device=tile_m.device)
    tmin = torch.minimum(torch.floor(tile_m - tile_r).clamp_min(0).long(), upper)
    tmax = torch.minimum(torch.ceil(tile_m + tile_r).clamp_min(0).long(), upper)
    tmax = torch.where((radii > 0)[:, None], tmax, tmin)
    return tmin, tmax


def block_bounds(proj: Projection, width: int, height: int, tile_size: int, block_size: int) -> Tuple[Tensor, Tensor]:
    """Blocks (``block_size`` pixels, dividing ``tile_size``) where a Gaussian can contribute.

    The intersection of (1) gsplat's support, the pixels of the ``tile_size`` tiles its radius
    box overlaps (:func:`tile_bounds`), and (2) the bounding box of the ellipse outside which
    ``opacity * exp(-sigma) < 1/255``, where gsplat skips it anyway: ``sigma >= ln(255 opacity)``
    there, so the ellipse ``d^T Sigma^-1 d <= 2 ln(255 opacity)`` has half-extents
    ``sqrt(2 ln(255 opacity) Sigma_xx)`` and ``sqrt(.. Sigma_yy)``. Compositing over these blocks
    gives gsplat's result while evaluating far fewer (pixel, Gaussian) pairs.

    Returns:
        ``block_min [N, 2]`` (inclusive), ``block_max [N, 2]`` (exclusive), (x, y) block indices.
    """
    if tile_size % block_size:
        raise ValueError(f"block_size ({block_size}) must divide tile_size ({tile_size})")
    tile_width, tile_height = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tmin, tmax = tile_bounds(proj.means2d[0], proj.radii, tile_size, tile_width, tile_height)
    ratio = tile_size // block_size
    m = proj.means2d[0].detach()
    a, b, c = proj.conics.detach().unbind(-1)
    det = (a * c - b * b).clamp_min(1e-12)
    opac = proj.opacities.detach()
    level = 2 * torch.log(255.0 * opac.clamp_min(1e-12)).clamp_min(0)
    ext = torch.sqrt(level[:, None] * torch.stack([c / det, a / det], -1)) * (1 + 1e-3) + 1e-2  # float margin
    upper = torch.tensor([math.ceil(width / block_size), math.ceil(height / block_size)], device=m.device)
    bmin = torch.maximum(tmin * ratio, torch.floor((m - ext) / block_size).clamp_min(0).long())
    bmax = torch.minimum(torch.minimum(tmax * ratio, upper), torch.ceil((m + ext) / block_size).clamp_min(0).long())
    alive = (proj.radii > 0) & (opac >= ALPHA_MIN)
    bmin = torch.minimum(bmin, upper)
    bmax = torch.where(alive[:, None], torch.maximum(bmax, bmin), bmin)
    return bmin, bmax
