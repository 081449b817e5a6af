"""Pictures of a segmentation: similarity heatmaps and an overview sheet of all views with their masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..features import MASK_COLOR, heatmap_rgb, overlay_mask
from ..utils.io import atomic_path

__all__ = ["heatmap", "overview_image", "save_png"]


def heatmap(similarity: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """``[H, W]`` values -> ``[H, W, 3]`` uint8 turbo colours of ``clamp((v - lo) / (hi - lo), 0, 1)``
    (:func:`~mvfm_nerfstudio.features.heatmap_rgb`)."""
    rgb = heatmap_rgb(similarity.double(), lo, hi)
    return (rgb * 255).round().to(torch.uint8).cpu().numpy()


def _boundary(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of ``mask [H, W]`` with a 4-neighbour outside it."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    return (m - eroded)[0, 0] > 0


def overview_image(
    images: Callable[[int], torch.Tensor],
    masks: Callable[[int], torch.Tensor],
    views: Sequence[int],
    names: Sequence[str],
    query_view: Optional[int] = None,
    query_xy: Optional[Tuple[float, float]] = None,
    thumb_width: int = 256,
) -> np.ndarray:
    """A grid of thumbnails ``[rows * th, cols * tw, 3]`` uint8: each view with its mask tinted and outlined,
    its name, and (on ``query_view``) the query point ``query_xy`` (original pixel coordinates) marked.

    Args:
        images: ``i -> [3, H, W]`` in [0, 1]. masks: ``i -> [H, W]`` bool.
        views: which views, in order. names: a label per view index.
    """
    from PIL import Image, ImageDraw

    thumbs = []
    for i in views:
        img, mask = images(i), masks(i)
        h, w = img.shape[-2:]
        th = max(1, round(thumb_width * h / w))
        rgb = overlay_mask(img.permute(1, 2, 0), mask)
        rgb[_boundary(mask)] = rgb.new_tensor(MASK_COLOR)
        small = F.interpolate(rgb.permute(2, 0, 1)[None], size=(th, thumb_width), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        tile = Image.fromarray((small.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(tile)
        label = str(names[i])
        draw.rectangle([0, 0, min(thumb_width, 7 * len(label) + 6), 13], fill=(0, 0, 0))
        draw.text((3, 1), label, fill=(255, 255, 255))
        if i == query_view and query_xy is not None:
            cx, cy = query_xy[0] * thumb_width / w, query_xy[1] * th / h
            for radius, colour in ((7, (0, 0, 0)), (5, (255, 255, 255)), (3, (0, 0, 0))):
                draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=2)
        thumbs.append(np.asarray(tile))
    cols = max(1, min(len(thumbs), 8, math.ceil(math.sqrt(len(thumbs)))))
    rows = math.ceil(len(thumbs) / cols)
    th_max = max(t.shape[0] for t in thumbs)
    sheet = np.full((rows * th_max, cols * thumb_width, 3), 32, dtype=np.uint8)
    for k, t in enumerate(thumbs):
        r, c = divmod(k, cols)
        sheet[r * th_max : r * th_max + t.shape[0], c * thumb_width : (c + 1) * thumb_width] = t
    return sheet


def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
