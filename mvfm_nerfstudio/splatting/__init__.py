"""Gaussian-splat rasterisation with gsplat's conventions: CUDA (gsplat) or pure PyTorch (CPU).

A functional core without Nerfstudio (gsplat style): :mod:`.projection` (projection and support),
:mod:`.composite` (the dense reference and the fast tile compositor), :mod:`.rasterize` (the entry
point and spherical harmonics). ``mvfm-splat`` renders through it.

One functional entry point, :func:`rasterize`, renders any number of channels per Gaussian
(RGB, latent features and optionally depth are rendered in ONE pass by concatenating
channels). Backends:

* ``"gsplat"``: :func:`gsplat.rasterization` (CUDA kernels; needs a GPU).
* ``"torch"``: gsplat's PyTorch reference *projection* (``_fully_fused_projection``, works on
  CPU) followed by our own vectorised tile compositor :func:`composite_tiles`; autograd
  gives the backward pass.
* ``"auto"``: ``"gsplat"`` for CUDA tensors when its kernels build/load, ``"torch"`` otherwise
  (:func:`~.rasterize.resolve_backend`).

:func:`composite_reference` is a dense, obviously-correct compositor (every pixel against
every Gaussian, sorted by depth) used by the tests and the benchmark to check the fast path.

Conventions (identical to gsplat 1.4 ``rasterize_mode="classic"``, ``packed=False``):

* ``viewmat`` is world-to-camera ``[4, 4]`` in the OpenCV camera frame (x right, y down,
  z forward); ``K`` is ``[3, 3]`` in pixels; pixel ``(row i, col j)`` is sampled at its centre
  ``(u, v) = (j + 0.5, i + 0.5)``.
* Projection: EWA splatting with a ``eps2d`` (0.3 px²) screen-space blur; Gaussians with
  depth outside ``(near_plane, far_plane)`` or with ``radius <= radius_clip`` are culled;
  ``radius = ceil(3 * sqrt(largest eigenvalue of the 2D covariance))``.
* Support: a Gaussian is evaluated at every pixel of every ``tile_size`` tile its
  ``[mean - radius, mean + radius]`` box overlaps (gsplat's tile binning) and nowhere else.
* Per pixel, front to back (ties in depth broken by Gaussian index):
  ``sigma = 0.5 * (a dx² + c dy²) + b dx dy`` with the conic ``(a, b, c)``,
  ``alpha = min(0.999, opacity * exp(-sigma))``; a Gaussian is skipped when ``sigma < 0`` or
  ``alpha < 1/255``; compositing stops *before* the Gaussian that would take the
  transmittance ``T`` to ``<= 1e-4``. ``render = sum_k alpha_k T_k c_k (+ T background)``,
  ``alpha_out = 1 - T``. Expected depth (``render_depth=True``) is the composited z-depth
  divided by ``alpha_out``, like gsplat's ``"RGB+ED"``.

How the PyTorch path works and where it deviates from gsplat CUDA (:func:`composite_tiles`):

* It bins into ``block_size`` blocks (8 px; gsplat's 16 px ``tile_size`` still defines the
  support) restricted to where a Gaussian's alpha can reach 1/255, selects per pixel the
  Gaussians that contribute (no autograd) and composites only those (autograd). With
  ``max_per_pixel=None`` and ``max_per_block=None`` the result equals the dense reference,
  which follows gsplat's CUDA kernels rule by rule (summation order differs; the direct
  comparison, ``tests/test_rasterize.py::test_torch_backend_matches_gsplat_cuda``, runs only
  on a GPU).
* ``max_per_pixel`` (K, default 256) keeps each pixel's first K contributing Gaussians;
  ``max_per_block`` keeps the front K candidates per block. Either can drop Gaussians behind
  the first K: a pixel's error is then at most its remaining transmittance ``1 - alpha_out``
  times the largest colour magnitude; dropped Gaussians get no gradient from that pixel
  (``meta["n_truncated_pixel"]`` / ``meta["n_truncated_block"]`` count the drops).
* ``absgrad`` is supported (``meta["means2d"].absgrad`` after backward: the sum over pixels
  of ``|dL/d means2d|`` per pixel, as gsplat's); ``antialiased`` multiplies opacities by
  gsplat's compensation factor, as gsplat does. Packed mode, batched cameras, distributed
  rendering and non-pinhole cameras are not implemented.
"""

from .composite import bin_blocks, composite_lists, composite_reference, composite_tiles, select_contributions
from .projection import ALPHA_MAX, ALPHA_MIN, T_MIN, Projection, block_bounds, project_gaussians, tile_bounds
from .rasterize import GSPLAT_FIX, gsplat_cuda_status, rasterize, resolve_backend, sh_colors

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "GSPLAT_FIX",
    "T_MIN",
    "Projection",
    "bin_blocks",
    "block_bounds",
    "composite_lists",
    "composite_reference",
    "composite_tiles",
    "gsplat_cuda_status",
    "project_gaussians",
    "rasterize",
    "resolve_backend",
    "select_contributions",
    "sh_colors",
    "tile_bounds",
]
