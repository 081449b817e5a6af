"""Multi-view segmentation from one query feature (the library behind ``mvfm-segment``).

Pipeline (:func:`segment_scene`):

1. MVFM features of every view of a posed scene, through the same feature store (and on-disk
   cache) the Nerfstudio plugin uses: views grouped into sets of nearest views, the MVFM run
   set by set, a view's features averaged over the sets it is in, optionally PCA-reduced
   (centred) to ``feature_dim`` channels. Each view's ``[h, w, D]`` map spans its whole image:
   cell ``(i, j)`` is centred at pixel ``((j + 0.5) W / w, (i + 0.5) H / h)``.
2. A query feature ``[D]``: bilinearly sampled at a pixel of one view
   (:func:`sample_feature`, same pixel-centre convention), or loaded from a
   ``query_feature.safetensors`` written by an earlier run (:func:`load_query`).
3. Cosine similarity of every cell with the query, upsampled to each image's original
   resolution (bilinear, ``align_corners=False``: pixel-centre correct), and one threshold for
   all views: a fixed cosine value, or Otsu's threshold on the histogram of all views'
   upsampled similarities pooled together (:func:`otsu_threshold`), so every view is cut at
   the same level and the masks are consistent.
4. Outputs (:func:`write_outputs`): ``masks/<image stem>.png`` (8-bit, 255 = in the
   segment, original resolution), ``similarity/<image stem>.png`` (turbo colour map of the
   cosine similarity clamped to [0, 1]), ``overview.png`` (thumbnails with the mask tinted
   and outlined, the query point marked), ``query_feature.safetensors`` and ``segment.json``.

No Nerfstudio import here: the feature extraction is the core's :class:`FeatureStore`
(:mod:`mvfm_nerfstudio.feature_store`), shared with the Nerfstudio plugin.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .features import cosine_similarity
from .feature_store import FeatureStoreConfig
from .utils.io import atomic_path, atomic_write

__all__ = [
    "MASK_COLOR",
    "QueryFeature",
    "MultiViewSegmentation",
    "SegmentConfig",
    "sample_feature",
    "similarity_grid",
    "upsample_map",
    "otsu_threshold",
    "segment_views",
    "mask_iou",
    "overlay_mask",
    "heatmap",
    "overview_image",
    "save_query",
    "load_query",
    "write_outputs",
    "segment_scene",
]

MASK_COLOR = (1.0, 0.25, 0.1)
"""RGB tint of segmentation overlays (overview and the viewer's ``segmentation_overlay``)."""

Size = Tuple[int, int]


# ---------------------------------------------------------------------------------------------- maps


def sample_feature(feature_map: torch.Tensor, xy: torch.Tensor, image_size: Size) -> torch.Tensor:
    """Bilinear features at pixel coordinates of the image a feature map spans.

    Args:
        feature_map: ``[h, w, D]`` covering an ``H x W`` image.
        xy: ``[2]`` or ``[R, 2]`` pixel coordinates ``(x, y)``, pixel centres at ``(col + 0.5, row + 0.5)``.
        image_size: ``(H, W)``.

    Returns:
        ``[D]`` or ``[R, D]`` (clamped at the borders, as ``FeatureStore.sample``).
    """
    h_img, w_img = image_size
    pts = torch.as_tensor(xy, dtype=torch.float32).reshape(-1, 2)
    grid = torch.stack([2 * pts[:, 0] / w_img - 1, 2 * pts[:, 1] / h_img - 1], dim=-1).to(feature_map)
    x = feature_map.permute(2, 0, 1)[None].float()
    out = F.grid_sample(x, grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
    out = out[0, :, 0].T  # [R, D]
    return out[0] if torch.as_tensor(xy).ndim == 1 else out


def similarity_grid(feature_map: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[h, w]`` of a ``[h, w, D]`` feature map with a ``[D]`` query."""
    if feature_map.shape[-1] != query.shape[-1]:
        raise ValueError(f"query has {query.shape[-1]} channels but the features have {feature_map.shape[-1]}")
    return cosine_similarity(feature_map.float(), query.float())[..., 0]


def upsample_map(grid: torch.Tensor, size: Size) -> torch.Tensor:
    """``[h, w]`` cell values -> ``[H, W]`` pixels, bilinear with ``align_corners=False`` (cell centres map to
    pixel ``((j + 0.5) W / w, (i + 0.5) H / h)``; values are clamped at the borders)."""
    return F.interpolate(grid[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def otsu_threshold(hist: torch.Tensor, lo: float = -1.0, hi: float = 1.0) -> float:
    """Otsu's threshold of a histogram with equal bins over ``[lo, hi]``.

    Maximises the between-class variance of {bins <= k} vs {bins > k}; returns the upper edge
    of bin ``k`` (so ``value >= threshold`` selects the upper class). When the maximum is a
    plateau (empty bins between two modes) the middle of the plateau is returned.
    """
    p = hist.double().flatten()
    total = p.sum()
    if total <= 0:
        raise ValueError("otsu_threshold: empty histogram")
    p = p / total
    bins = p.numel()
    centres = lo + (torch.arange(bins, dtype=torch.float64) + 0.5) * (hi - lo) / bins
    omega = p.cumsum(0)
    mu = (p * centres).cumsum(0)
    denom = omega * (1 - omega)
    valid = denom > 1e-12
    if not bool(valid.any()):  # a single occupied bin: nothing to split
        occupied = int(torch.nonzero(p)[0])
        return float(lo + (occupied + 1) * (hi - lo) / bins)
    between = torch.where(valid, (mu[-1] * omega - mu) ** 2 / denom.clamp_min(1e-12), torch.zeros_like(p))
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).flatten().double()
    k = float(best.mean())
    return float(lo + (k + 1) * (hi - lo) / bins)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    pred, target = pred.bool(), target.bool()
    union = int((pred | target).sum())
    return 1.0 if union == 0 else int((pred & target).sum()) / union


@dataclass
class MultiViewSegmentation:
    """Similarity grids of all views and one threshold; full-resolution maps on demand.

    Attributes:
        grids: ``N`` similarity grids ``[h, w]`` (cosine, in [-1, 1]).
        image_sizes: ``[N, 2]`` ``(H, W)`` the grids span.
        threshold: cosine threshold (``similarity >= threshold`` is in the segment).
        threshold_mode: ``"fixed"`` or ``"otsu"``.
    """

    grids: List[torch.Tensor]
    image_sizes: torch.Tensor
    threshold: float
    threshold_mode: str

    def __len__(self) -> int:
        return len(self.grids)

    def similarity(self, i: int) -> torch.Tensor:
        """``[H, W]`` similarity of view ``i`` at its original resolution."""
        return upsample_map(self.grids[i], tuple(int(v) for v in self.image_sizes[i]))

    def mask(self, i: int) -> torch.Tensor:
        """``[H, W]`` bool mask of view ``i`` at its original resolution."""
        return self.similarity(i) >= self.threshold


def segment_views(
    feature_maps: Union[Sequence[torch.Tensor], Callable[[int], torch.Tensor]],
    image_sizes: torch.Tensor,
    query: torch.Tensor,
    threshold: Optional[float] = None,
    bins: int = 512,
) -> MultiViewSegmentation:
    """Segment every view by cosine similarity to one query feature.

    Args:
        feature_maps: ``N`` maps ``[h, w, D]`` (or ``i -> map``), each spanning its whole image.
        image_sizes: ``[N, 2]`` ``(H, W)`` of the original images.
        query: ``[D]``.
        threshold: cosine threshold; None = Otsu on the pooled full-resolution similarities of all views.
        bins: histogram bins over [-1, 1] for Otsu.
    """
    n = len(image_sizes)
    get = feature_maps if callable(feature_maps) else feature_maps.__getitem__
    grids = [similarity_grid(get(i), query) for i in range(n)]
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        return MultiViewSegmentation(grids, image_sizes, float(threshold), "fixed")
    hist = torch.zeros(bins, dtype=torch.float64)
    for i, g in enumerate(grids):
        up = upsample_map(g, tuple(int(v) for v in image_sizes[i]))
        hist += torch.histc(up.double(), bins=bins, min=-1.0, max=1.0)
    return MultiViewSegmentation(grids, image_sizes, otsu_threshold(hist), "otsu")


# ---------------------------------------------------------------------------------------------- images


def overlay_mask(rgb: torch.Tensor, mask: torch.Tensor, alpha: float = 0.55,
                 color: Tuple[float, float, float] = MASK_COLOR) -> torch.Tensor:
    """Tint ``rgb [..., 3]`` (in [0, 1]) by ``color`` where ``mask [...]`` or ``[..., 1]`` (0/1 or bool)."""
    m = mask.to(rgb.dtype)
    if m.ndim == rgb.ndim - 1:
        m = m[..., None]
    a = alpha * m
    return rgb * (1 - a) + rgb.new_tensor(color) * a


def heatmap(similarity: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """``[H, W]`` values -> ``[H, W, 3]`` uint8 turbo colours of ``clamp((v - lo) / (hi - lo), 0, 1)``."""
    import matplotlib

    t = ((similarity.float() - lo) / (hi - lo)).clamp(0, 1).cpu().numpy()
    return (matplotlib.colormaps["turbo"](t)[..., :3] * 255).round().astype(np.uint8)


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


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------- query files


@dataclass
class QueryFeature:
    """A query feature and where it lives.

    Attributes:
        query: ``[D]`` in the feature space named by ``metadata["feature_space"]``.
        query_full: ``[D_full]`` the same feature in the backbone's full channel space
            (``reduction.unproject(query)``) when the features were PCA-reduced, else None.
        metadata: strings (backbone, weights, feature_space, scene, view, pixel, ...).
    """

    query: torch.Tensor
    query_full: Optional[torch.Tensor]
    metadata: Dict[str, str]


def save_query(path: Union[str, Path], q: QueryFeature) -> None:
    """Write a query feature to ``.safetensors`` (tensors ``query`` and optionally ``query_full``; atomic)."""
    from safetensors.torch import save

    tensors = {"query": q.query.detach().float().cpu().contiguous()}
    if q.query_full is not None:
        tensors["query_full"] = q.query_full.detach().float().cpu().contiguous()
    atomic_write(path, save(tensors, metadata={k: str(v) for k, v in q.metadata.items()}))


def load_query(path: Union[str, Path]) -> QueryFeature:
    """Read a file written by :func:`save_query` (or any safetensors file with a 1-D ``query`` tensor)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query feature file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if "query" not in keys:
            raise ValueError(f"{path} has no 'query' tensor (found {sorted(keys)}); write it with save_query")
        query = f.get_tensor("query").float()
        full = f.get_tensor("query_full").float() if "query_full" in keys else None
        meta = dict(f.metadata() or {})
    if query.ndim != 1:
        raise ValueError(f"{path}: 'query' must be a 1-D feature vector, got shape {tuple(query.shape)}")
    return QueryFeature(query, full, meta)


def _query_in_space(q: QueryFeature, space: str, backbone: str, dim: int, reduction, source: str) -> torch.Tensor:
    """Express a saved query in the current feature space (``dim`` channels, PCA ``reduction`` or None).

    Same space (``metadata["feature_space"]``): used as is. Otherwise through the backbone's full
    channel space: ``query_full`` (or ``query`` itself when it was saved unreduced,
    ``metadata["reduced"] == "0"``), projected with the current reduction. A file without
    metadata is taken as a feature of the current space if it has ``dim`` channels, else as a
    full backbone feature.
    """
    d_full = reduction.components.shape[1] if reduction is not None else dim
    if "feature_space" not in q.metadata:
        if q.query.numel() == dim:
            return q.query
        full = q.query
    else:
        if q.metadata["feature_space"] == space and q.query.numel() == dim:
            return q.query
        saved_backbone = q.metadata.get("backbone")
        if saved_backbone is not None and saved_backbone != backbone:
            raise ValueError(f"query feature {source} comes from backbone {saved_backbone!r}, but the features here "
                             f"are from {backbone!r}: use the same backbone (--features.backbone {saved_backbone})")
        full = q.query_full if q.query_full is not None else q.query if q.metadata.get("reduced") == "0" else None
        if full is None:
            raise ValueError(f"query feature {source} was saved in another PCA-reduced feature space without "
                             "'query_full'; re-create it from a pixel, or use the same scene and feature settings")
    if full.numel() != d_full:
        raise ValueError(f"query feature {source} has {full.numel()} channels; the features here have {dim}"
                         + (f" ({d_full} before PCA)" if reduction is not None else ""))
    return reduction.project(full) if reduction is not None else full


# ---------------------------------------------------------------------------------------------- the tool


@dataclass
class SegmentConfig:
    """mvfm-segment: consistent masks of one queried thing in every view of a posed scene, from MVFM features."""

    scene: Path
    """Scene folder (Nerfstudio transforms.json and/or COLMAP model; anything mvfm_nerfstudio.data.load_scene reads)."""
    output_dir: Path = Path("outputs/segment")
    """Where masks/, similarity/, overview.png, query_feature.safetensors and segment.json go."""
    query_view: Optional[int] = None
    """Index of the view holding the query pixel (with --query-pixel)."""
    query_pixel: Optional[Tuple[float, float]] = None
    """Query pixel X Y = column and row (0-based) in the original-size (undistorted) image of --query-view; the
    feature is sampled at the pixel's centre (X + 0.5, Y + 0.5). Fractional values are allowed."""
    query_feature: Optional[Path] = None
    """Instead of a pixel: a query_feature.safetensors written by an earlier mvfm-segment run (any scene with the
    same backbone; it is re-projected if this scene's features are reduced differently)."""
    threshold: Optional[float] = None
    """Cosine-similarity threshold of the masks. None = automatic: Otsu's threshold on the histogram of all views'
    similarities pooled together (one threshold for all views)."""
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    """MVFM features (FeatureStoreConfig): backbone, weights, adapters, views per set, view grouping, resolution,
    PCA dimension, cache dir, per-scene adaptation. Without adapters (and without --features.adapt) the MVFM equals
    its base model, so the views are run one by one (multi_view is switched off: same features, fewer passes)."""
    device: str = "cpu"
    """Device for feature extraction ('cpu', 'cuda')."""
    overview_max_views: int = 48
    """At most this many views in overview.png (evenly spaced, always including the query view)."""
    overview_thumb_width: int = 256
    """Width of each overview thumbnail in pixels."""


def _output_names(paths: Sequence[Path]) -> List[str]:
    """``<stem>.png`` per image, prefixed with the view index when stems collide."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return [f"{s}.png" for s in stems]
    return [f"{i:05d}_{s}.png" for i, s in enumerate(stems)]


def _overview_views(n: int, max_views: int, query_view: Optional[int]) -> List[int]:
    if n <= max_views:
        return list(range(n))
    picked = {int(round(k * (n - 1) / (max_views - 1))) for k in range(max_views)}
    if query_view is not None and query_view not in picked:
        picked.discard(min(picked, key=lambda v: abs(v - query_view)))
        picked.add(query_view)
    return sorted(picked)


def write_outputs(
    seg: MultiViewSegmentation,
    load_image: Callable[[int], torch.Tensor],
    image_paths: Sequence[Path],
    output_dir: Path,
    query_view: Optional[int] = None,
    query_xy: Optional[Tuple[float, float]] = None,
    overview_max_views: int = 48,
    thumb_width: int = 256,
    progress: bool = True,
) -> Dict[str, object]:
    """Write masks, similarity heatmaps and overview.png (see the module docstring); return per-view stats.

    Args:
        load_image: ``i -> [3, H, W]`` in [0, 1] (only needed for the overview's views).
        query_xy: the query point in original pixel coordinates (centre convention) for the overview marker.
    """
    from rich.progress import track

    output_dir = Path(output_dir)
    names = _output_names(image_paths)
    rows = []
    it = range(len(seg))
    if progress:
        it = track(it, description="Writing masks", transient=True)
    for i in it:
        sim = seg.similarity(i)
        mask = sim >= seg.threshold
        _save_png(output_dir / "masks" / names[i], (mask.numpy().astype(np.uint8) * 255))
        _save_png(output_dir / "similarity" / names[i], heatmap(sim))
        rows.append({"view": i, "image": str(image_paths[i]), "mask": f"masks/{names[i]}",
                     "mask_fraction": float(mask.float().mean()), "max_similarity": float(sim.max())})
    views = _overview_views(len(seg), overview_max_views, query_view)
    labels = [Path(p).stem for p in image_paths]
    sheet = overview_image(load_image, seg.mask, views, labels, query_view, query_xy, thumb_width)
    _save_png(output_dir / "overview.png", sheet)
    return {"views": rows, "overview_views": views}


def segment_scene(config: SegmentConfig, progress: bool = True) -> Dict[str, object]:
    """Run ``mvfm-segment`` (see the module docstring); returns the summary also written to ``segment.json``."""
    from dataclasses import asdict, replace

    from .data import load_scene
    from .feature_store import FeatureStore, ViewSource

    fcfg = config.features
    by_pixel = config.query_view is not None or config.query_pixel is not None
    if by_pixel == (config.query_feature is not None):
        raise ValueError("give exactly one query: --query-view I --query-pixel X Y, or --query-feature FILE")
    if by_pixel and (config.query_view is None or config.query_pixel is None):
        raise ValueError("a pixel query needs both --query-view and --query-pixel")
    scene = load_scene(config.scene)
    n = len(scene)
    if by_pixel:
        if not 0 <= config.query_view < n:
            raise ValueError(f"--query-view {config.query_view} is out of range: the scene has {n} views (0..{n - 1})")
        h, w = scene.image_size(config.query_view)
        x, y = config.query_pixel
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"--query-pixel {x} {y} is outside view {config.query_view} "
                             f"({scene.frame_names[config.query_view]}, {w}x{h} pixels: X in [0, {w}), Y in [0, {h}))")
    if fcfg.adapters is None and not fcfg.adapt and fcfg.multi_view:
        fcfg = replace(fcfg, multi_view=False)  # untrained adapters reproduce the base model exactly
    extra = {}
    if scene.distortion is not None:
        extra["undistorted"] = scene.distortion.round(decimals=6).tolist()
    views = ViewSource(
        image_paths=list(scene.image_paths), image_sizes=scene.image_sizes, intrinsics=scene.intrinsics,
        cam_to_world=scene.cam_to_world, load_image=lambda i: scene.load_image(i).permute(1, 2, 0),
        extra_key=extra, scene_name=scene.name, scene_root=scene.root,
    )
    store = FeatureStore(fcfg, views, device=config.device).prepare()
    space = store.path.name
    reduction = store.reduction_basis
    if by_pixel:
        xy = (float(config.query_pixel[0]) + 0.5, float(config.query_pixel[1]) + 0.5)
        query = store.sample(torch.tensor([config.query_view]), torch.tensor([xy], dtype=torch.float64))[0]
        source = f"view {config.query_view} ({scene.frame_names[config.query_view]}) pixel {config.query_pixel}"
        meta = {"source": "pixel", "scene": str(scene.root), "view": str(config.query_view),
                "image": scene.frame_names[config.query_view], "pixel_xy": json.dumps(list(config.query_pixel))}
    else:
        loaded = load_query(config.query_feature)
        query = _query_in_space(loaded, space, fcfg.backbone, store.feature_dim, reduction, str(config.query_feature))
        source = f"file {config.query_feature}"
        meta = {**loaded.metadata, "source": f"file:{config.query_feature}"}
        xy = None
    meta.update({"backbone": fcfg.backbone, "weights": str(fcfg.weights), "feature_space": space,
                 "feature_dim": str(store.feature_dim), "reduced": "1" if reduction is not None else "0"})
    full = reduction.unproject(query) if reduction is not None else None
    output_dir = Path(config.output_dir)
    save_query(output_dir / "query_feature.safetensors", QueryFeature(query, full, meta))

    seg = segment_views(store.feature_map, scene.image_sizes, query, config.threshold)
    written = write_outputs(seg, scene.load_image, scene.image_paths, output_dir,
                            config.query_view if by_pixel else None, xy, config.overview_max_views,
                            config.overview_thumb_width, progress)
    summary = {
        "scene": str(scene.root), "num_views": n, "query": source,
        "threshold": seg.threshold, "threshold_mode": seg.threshold_mode,
        "feature_cache": str(store.path), "feature_grid": list(store.grid), "feature_dim": store.feature_dim,
        "features": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(fcfg).items()},
        **written,
    }
    atomic_write(output_dir / "segment.json", json.dumps(summary, indent=1).encode())
    return summary
