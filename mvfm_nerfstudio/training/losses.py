"""Training losses for MV-Adapters (METHOD.md, "Training").

All losses take the feature maps of ONE view set, ``[S, C, h, w]``, and its correspondences
(:class:`~mvfm_nerfstudio.data.Correspondences`, or anything with ``src_view``/``dst_view`` ``[P]``
view positions within the set and ``src_xy``/``dst_xy`` ``[P, 2]`` pixel coordinates of the
training-resolution images, e.g. from ``Correspondences.scaled``).
Coordinate conventions are those of :mod:`mvfm_nerfstudio.geometry.feature_grid` (pixel centres at
``+0.5``, feature cell centres at ``(c + 0.5) * patch``): ground truth and soft-argmax grid agree,
unlike the authors' ``align_corners=True`` grid, which is biased by half a cell.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Tuple

import torch
import torch.nn.functional as F

from ..geometry.feature_grid import cell_centers, pixel_to_normalized, query_similarity, sample_views

if TYPE_CHECKING:
    from ..data import Correspondences

__all__ = ["location_loss", "soft_argmax", "base_regularizer", "info_nce_loss"]


def soft_argmax(similarity: torch.Tensor, grid: Tuple[int, int], temperature: float) -> torch.Tensor:
    """Expected normalised cell-centre coordinate under ``softmax(similarity / temperature)``.

    Args:
        similarity: ``[P, h*w]`` (row-major cells).
        grid: ``(h, w)``.
        temperature: softmax temperature (the paper: 0.02 on cosine similarities).

    Returns:
        ``[P, 2]`` normalised (x, y).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prob = torch.softmax(similarity / temperature, dim=-1)
    return prob @ cell_centers(grid, device=similarity.device, dtype=similarity.dtype)


def location_loss(
    features: torch.Tensor,
    corr: "Correspondences",
    image_size: Tuple[int, int],
    temperature: float = 0.02,
) -> torch.Tensor:
    """Dense soft-argmax location loss of one view set.

    For each correspondence: sample the query feature at ``src_xy`` in view ``src_view``
    (bilinear), take its cosine similarity to every cell of view ``dst_view``, softmax with
    ``temperature``, and compare the expected cell-centre coordinate with ``dst_xy``.

    Args:
        features: ``[S, C, h, w]``.
        corr: correspondences of the set; ``src_xy``, ``dst_xy`` in pixels of ``image_size``
            images (pixel-centre convention).
        image_size: ``(H, W)`` of the images the features were computed from.
        temperature: softmax temperature.

    Returns:
        Scalar: mean over correspondences and both coordinates of the L1 error in ``[-1, 1]``
        coordinates (the same units as Loc. Err.).
    """
    if len(corr) == 0:
        return features.sum() * 0.0
    grid = tuple(features.shape[-2:])
    sim = query_similarity(features, corr.src_view, corr.dst_view, pixel_to_normalized(corr.src_xy, image_size))
    pred = soft_argmax(sim, grid, temperature)
    return (pred - pixel_to_normalized(corr.dst_xy, image_size).to(pred)).abs().mean()


def base_regularizer(features: torch.Tensor, base: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Keep-the-base regulariser, per pixel ``|‖f‖/‖f_base‖ - 1| + (1 - cos(f, f_base))``, averaged.

    Args:
        features, base: ``[..., C, h, w]`` MVFM and frozen base features of the same images.
    """
    if features.shape != base.shape:
        raise ValueError(f"features {tuple(features.shape)} and base {tuple(base.shape)} must have the same shape")
    base = base.to(features)
    ratio = features.norm(dim=-3) / base.norm(dim=-3).clamp_min(eps)
    cos = F.cosine_similarity(features, base, dim=-3, eps=eps)
    return ((ratio - 1).abs() + (1 - cos)).mean()


def info_nce_loss(
    features: torch.Tensor,
    corr: "Correspondences",
    image_size: Tuple[int, int],
    temperature: float = 0.07,
) -> torch.Tensor:
    """One-directional InfoNCE over the correspondences of one set (off by default, as in the paper).

    Each query's positive is its own target feature; the other correspondences' targets are
    the negatives. Features are bilinearly sampled and L2-normalised.
    """
    p = len(corr)
    if p < 2:
        return features.sum() * 0.0
    ar = torch.arange(p, device=features.device)
    q = sample_views(features, corr.src_view, pixel_to_normalized(corr.src_xy, image_size))
    k = sample_views(features, corr.dst_view, pixel_to_normalized(corr.dst_xy, image_size))
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / temperature
    return F.cross_entropy(logits, ar)
