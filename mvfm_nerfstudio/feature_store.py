"""MVFM feature extraction for a set of posed training views, with a content-keyed disk cache.

:class:`FeatureStore` is shared by the Nerfstudio plugin's datamanagers (ray-based for
NeRF, full-image for splatting) and by ``mvfm-segment``. It lives in the core because it
has no Nerfstudio or ray-sampler dependency: it is given plain tensors (:class:`ViewSource`) and

1. groups the views into multi-view sets (:func:`group_views`): by default the whole scene
   is one set in which each view attends to its ``views_per_set - 1`` nearest views by
   pose (knn attention, every view computed once); the other groupings make sets of
   ``views_per_set`` nearby views (a view may belong to several sets);
2. resizes every image to the common MVFM input size ``(h*p, w*p)`` (``p`` = patch size,
   ``(h, w)`` the feature grid from ``feature_resolution``), scales the intrinsics exactly
   (``K' = diag(sx, sy, 1) K``, pixel-centre convention), optionally adapts the MVFM to
   the scene, and runs it set by set;
3. **combines** the features of a view that appears in several sets by their plain
   average, accumulated in float32 in the fixed order of the sets (deterministic);
4. optionally reduces the features with PCA to ``feature_dim`` channels (basis saved);
5. writes ``features.npy`` (float16 ``[N, h, w, D]``), ``bases.safetensors`` (reduction
   and display PCA bases) and ``meta.json`` (written last; its presence marks a complete
   entry) atomically to ``<cache_dir>/<scene>-<key>/``, and reads them back memory-mapped
   so RAM stays bounded for hundreds of images.

The cache key hashes everything the features depend on: image file bytes, image sizes,
cameras, backbone, weights (file contents for weight/adapter files), seed, and every
option below. Changing any of them computes a new entry; the old one is left on disk.

Pixel mapping: each image's ``[h, w]`` feature map spans the whole image, so cell
``(i, j)`` is centred at pixel ``((j + 0.5) W / w, (i + 0.5) H / h)`` of an ``H x W``
image (pixel centres at ``col + 0.5``). :meth:`FeatureStore.sample` interpolates
bilinearly at any pixel coordinate with that convention (clamped at the borders, i.e.
``grid_sample(align_corners=False, padding_mode="border")``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .features import PCABasis, fit_pca
from .utils.io import atomic_path, atomic_write

__all__ = [
    "FeatureStoreConfig",
    "ViewSource",
    "FeatureStore",
    "group_views",
    "feature_grid",
    "default_cache_dir",
    "resize_feature_map",
    "CACHE_FORMAT_VERSION",
]

CACHE_FORMAT_VERSION = 1
"""Bump when the meaning of cached features changes (it is part of every cache key)."""

_PCA_FIT_SAMPLES = 50_000


def default_cache_dir() -> Path:
    """``$MVFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/mvfm_nerfstudio/features`` (``~/.cache/...``)."""
    if os.environ.get("MVFM_CACHE_DIR"):
        return Path(os.environ["MVFM_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "mvfm_nerfstudio" / "features"


@dataclass
class FeatureStoreConfig:
    """Which MVFM features supervise the scene, and where they are cached."""

    backbone: str = "dinov2_vits14_reg"
    """Foundation backbone (see `mvfm-info`): dinov2_vits14_reg, dinov3_vits16, clip_vitb16, sam_vitb, ..."""
    weights: str = "pretrained"
    """Backbone weights: 'pretrained' (timm weights from the Hugging Face cache/hub; fails fast offline), a path to a
    local .safetensors/.pth file, or 'random' (demos/tests only: features carry no meaning)."""
    tiny: bool = False
    """Use a tiny 2-block test-size backbone (requires weights='random'; tests only)."""
    adapters: Optional[Path] = None
    """MV-Adapter checkpoint (.safetensors from mvfm-train). None = untrained adapters, which reproduce the base
    model exactly: the features are then single-view (no multi-view consistency is added)."""
    multi_view: bool = True
    """Run the adapters over multi-view sets; False = the plain 2D backbone per image (for comparison)."""
    attention: Literal["global", "knn"] = "global"
    """Cross-view attention inside a set: 'global' (all views, the paper) or 'knn' (each view's nearest views).
    Ignored by the 'scene' grouping, which always uses knn attention."""
    views_per_set: int = 4
    """Views the MVFM sees together (clipped to the number of training views); with the 'scene' grouping, each view
    attends to itself and its views_per_set-1 nearest views."""
    view_grouping: Literal["scene", "neighbors", "cover", "partition"] = "scene"
    """How views are grouped into sets (nearest views by camera centre and viewing direction):
    'scene' = all views in one pass with knn attention: each view attends to its views_per_set-1 nearest views and is
    computed once (cost ~ one MVFM pass per image; scenes with more than max_views_per_pass views are split into
    pose-compact chunks);
    'neighbors' = one set per view (the view + its views_per_set-1 nearest), each view's features averaged over the
    ~views_per_set sets it appears in (N forward passes: ~views_per_set x the cost);
    'cover' = the same proposals, keeping a view's set only if the view is not yet in a kept set (every view covered,
    fewer passes); a view in several kept sets gets the average;
    'partition' = disjoint sets of nearby views (each view computed once; the last set is filled up with
    already-used views, whose features are averaged)."""
    max_views_per_pass: int = 64
    """'scene' grouping: most views in one MVFM pass (memory grows linearly with it)."""
    kv_pool: int = 2
    """Average-pool the other views' attention keys/values by this factor per side (a view's own tokens stay at full
    resolution): 2 makes the adapters' cross-view attention cheaper (1.6x instead of 2.2x the base at 448 px, 8 views)
    with Loc. Err. at most 2% above unpooled attention on the shared scenes (docs/performance.md); 1 = off."""
    feature_resolution: int = 32
    """Feature-grid cells along each image's longer side; the MVFM sees images resized to this many patches (the
    shorter side keeps the first image's aspect ratio, rounded to whole patches). Cost grows with its square."""
    feature_dim: Optional[int] = 64
    """Reduce cached features to this many channels with PCA (basis saved in the cache); None = keep all of the
    backbone's channels (384 for ViT-S)."""
    cache_dir: Optional[Path] = None
    """Feature cache directory; None = $MVFM_CACHE_DIR or ~/.cache/mvfm_nerfstudio/features."""
    sets_per_batch: int = 1
    """View sets per MVFM forward pass (more = faster on GPU, more memory)."""
    seed: int = 0
    """Seed for random backbone/adapter initialisation, PCA subsampling and adaptation."""
    device: Optional[str] = None
    """Device for extraction ('cpu', 'cuda'); None = the training device."""
    adapt: bool = False
    """Adapt the MV-Adapters to this scene before extraction (self-supervised with the scene's SfM tracks when
    available, else its depth maps), reusing mvfm_nerfstudio.training."""
    adapt_steps: int = 100
    """Optimisation steps of per-scene adaptation."""
    adapt_lr: float = 5e-4
    """Peak learning rate of per-scene adaptation (AdamW; other settings from the training preset
    'scene-adapt-cpu')."""

    def key_fields(self) -> Dict[str, object]:
        """The options that change the features (device, cache_dir and batching do not)."""
        d = asdict(self)
        for k in ("cache_dir", "sets_per_batch", "device", "adapters", "weights"):
            d.pop(k)
        if not self.adapt:
            d.pop("adapt_steps"), d.pop("adapt_lr")
        if self.view_grouping != "scene":
            d.pop("max_views_per_pass")
        if self.kv_pool == 1:
            d.pop("kv_pool")  # keys of entries made before the option existed stay valid
        return d


@dataclass
class ViewSource:
    """The training views as the consumer (NeRF or splats) sees them.

    Attributes:
        image_paths: ``N`` image files; their bytes key the cache.
        image_sizes: ``[N, 2]`` long ``(H, W)`` of the images as loaded by ``load_image``.
        intrinsics: ``[N, 3, 3]`` pinhole matrices in pixels of those images (pixel centres at ``col + 0.5``).
        cam_to_world: ``[N, 4, 4]`` OpenCV camera-to-world poses (any similarity frame).
        load_image: ``i -> [H, W, 3]`` (or ``[H, W, 4]``, alpha ignored) float in [0, 1] or uint8.
        extra_key: anything else that changes the pixels (rescaling, undistortion), JSON-serialisable.
        scene_name: short name used in the cache entry's directory name.
        scene_root: the scene directory (for per-scene adaptation: SfM tracks or depth).
    """

    image_paths: List[Path]
    image_sizes: torch.Tensor
    intrinsics: torch.Tensor
    cam_to_world: torch.Tensor
    load_image: Callable[[int], torch.Tensor]
    extra_key: Dict[str, object] = field(default_factory=dict)
    scene_name: str = "scene"
    scene_root: Optional[Path] = None

    def __post_init__(self) -> None:
        n = len(self.image_paths)
        if n == 0:
            raise ValueError("ViewSource has no images: the feature store needs at least one training view")
        for name, t, shape in (
            ("image_sizes", self.image_sizes, (n, 2)),
            ("intrinsics", self.intrinsics, (n, 3, 3)),
            ("cam_to_world", self.cam_to_world, (n, 4, 4)),
        ):
            if tuple(t.shape) != shape:
                raise ValueError(f"ViewSource.{name} must be {list(shape)} for {n} images, got {list(t.shape)}")

    def __len__(self) -> int:
        return len(self.image_paths)


def feature_grid(height: int, width: int, resolution: int) -> Tuple[int, int]:
    """Feature grid ``(h, w)`` with ``resolution`` cells along the longer side, aspect kept."""
    if resolution < 1:
        raise ValueError(f"feature_resolution must be >= 1, got {resolution}")
    if width >= height:
        return max(1, round(resolution * height / width)), resolution
    return resolution, max(1, round(resolution * width / height))


GROUPINGS = ("scene", "neighbors", "cover", "partition")


def group_views(
    cam_to_world: torch.Tensor, views_per_set: int, mode: str = "neighbors", max_views_per_pass: int = 64
) -> List[Tuple[int, ...]]:
    """Multi-view sets of nearby views.

    Each view ``i`` proposes the set {i} + its ``views_per_set - 1`` nearest views (distance
    ``|c_i - c_j| / r + (1 - cos angle(z_i, z_j))``, see
    :func:`~mvfm_nerfstudio.models.attention.select_neighbor_views`). ``"neighbors"`` keeps
    every distinct proposal; ``"cover"`` walks the views in order and keeps a view's
    proposal only if the view is not yet in a kept set; ``"partition"`` walks the views in
    order and makes a set of each not yet used view and its nearest not yet used views (the
    last set is filled up with its nearest used views); ``"scene"`` is one set of all views,
    or, above ``max_views_per_pass`` views, a partition into ``ceil(N / max_views_per_pass)``
    pose-compact chunks.

    Args:
        cam_to_world: ``[N, 4, 4]`` OpenCV poses.
        views_per_set: wanted set size S (clipped to N); not used by ``"scene"``.
        mode: one of ``"scene"``, ``"neighbors"``, ``"cover"``, ``"partition"``.
        max_views_per_pass: ``"scene"`` only.

    Returns:
        Sorted index tuples in a deterministic order; every view is in at least one set.
    """
    if mode not in GROUPINGS:
        raise ValueError(f"view_grouping must be one of {', '.join(map(repr, GROUPINGS))}, got {mode!r}")
    if views_per_set < 1 or max_views_per_pass < 1:
        raise ValueError(f"views_per_set and max_views_per_pass must be >= 1, got {views_per_set}, {max_views_per_pass}")
    from .models.attention import select_neighbor_views

    n = cam_to_world.shape[0]
    if mode == "scene":
        chunks = -(-n // max_views_per_pass)
        return group_views(cam_to_world, -(-n // chunks), "partition") if chunks > 1 else [tuple(range(n))]
    s = min(views_per_set, n)
    if s == 1:
        return [(i,) for i in range(n)]
    if mode == "partition":
        order = select_neighbor_views(n - 1, n, 1, cam_to_world[None].double())[0].tolist()  # all views, nearest first
        used: set = set()
        sets: List[Tuple[int, ...]] = []
        for i in range(n):
            if i in used:
                continue
            members = [i] + [j for j in order[i] if j not in used][: s - 1]
            members += [j for j in order[i] if j not in members][: s - len(members)]  # fill the last set
            used.update(members)
            sets.append(tuple(sorted(members)))
        return sets
    nbrs = select_neighbor_views(s - 1, n, 1, cam_to_world[None].double())[0].tolist()
    proposals = [tuple(sorted([i, *nbrs[i]])) for i in range(n)]
    sets = []
    seen_sets, covered = set(), set()
    for i, p in enumerate(proposals):
        if p in seen_sets or (mode == "cover" and i in covered):
            continue
        sets.append(p)
        seen_sets.add(p)
        covered.update(p)
    return sets


def resize_feature_map(feature_map: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Upsample a ``[h, w, D]`` feature map to an image's ``size = (H, W)`` -> ``[H, W, D]``.

    Bilinear with ``align_corners=False``: the same pixel mapping as :meth:`FeatureStore.sample`.
    """
    x = feature_map.permute(2, 0, 1)[None]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)


def _hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(chunk)
                if not block:
                    break
                h.update(block)
    except OSError as err:
        raise FileNotFoundError(f"cannot read {str(path)!r} to key the feature cache: {err}") from err
    return h.hexdigest()


def _weights_key(backbone: str, weights: str, tiny: bool) -> str:
    if weights == "random":
        return "random"
    if weights == "pretrained":
        from .backbones import get_backbone_spec
        from .backbones.vit import cached_pretrained_file

        spec = get_backbone_spec(backbone)
        cached = cached_pretrained_file(spec)
        return f"pretrained:{spec.timm_pretrained_name}:" + (_hash_file(Path(cached)) if cached else "not-cached")
    return "file:" + _hash_file(Path(weights).expanduser())


class FeatureStore:
    """Per-image MVFM feature maps for the training views, computed once and cached on disk.

    Args:
        config: extraction options.
        views: the training views.
        device: extraction device when ``config.device`` is None.

    Call :meth:`prepare` (loads or computes), then :meth:`feature_map` / :meth:`sample`.
    After :meth:`prepare`: ``cache_hit`` (bool), ``mvfm_forwards`` (MVFM forward passes
    run by this store; 0 on a cache hit), ``path`` (the cache entry), ``grid`` ``(h, w)``,
    ``feature_dim`` D, ``display_basis`` (3-component :class:`PCABasis` of the cached
    features, for fixed-colour renders) and ``reduction_basis`` (the PCA to D dims, or None).
    """

    def __init__(self, config: FeatureStoreConfig, views: ViewSource, device: str = "cpu"):
        self.config = config
        self.views = views
        self.device = torch.device(config.device or device)
        self.cache_hit = False
        self.mvfm_forwards = 0
        self.path: Optional[Path] = None
        self.features: Optional[np.ndarray] = None
        self.display_basis: Optional[PCABasis] = None
        self.reduction_basis: Optional[PCABasis] = None
        self._key: Optional[str] = None
        self._ingredients: Dict[str, object] = {}
        h0, w0 = (int(x) for x in views.image_sizes[0])
        self.grid = feature_grid(h0, w0, config.feature_resolution)

    # ------------------------------------------------------------------ key
    def key_ingredients(self) -> Dict[str, object]:
        """Everything the cached features depend on (JSON-serialisable)."""
        c, v = self.config, self.views
        r6 = lambda t: np.round(t.detach().double().cpu().numpy(), 6).tolist()  # noqa: E731
        return {
            "format": CACHE_FORMAT_VERSION,
            "images": [_hash_file(Path(p)) for p in v.image_paths],
            "image_sizes": v.image_sizes.tolist(),
            "intrinsics": r6(v.intrinsics),
            "cam_to_world": r6(v.cam_to_world),
            "extra": v.extra_key,
            "weights": _weights_key(c.backbone, c.weights, c.tiny),
            "adapters": _hash_file(Path(c.adapters).expanduser()) if c.adapters is not None else None,
            "options": c.key_fields(),
            "grid": list(self.grid),
        }

    def cache_key(self) -> str:
        """Hash of :meth:`key_ingredients` (computed once per store: it reads every image file)."""
        if self._key is None:
            self._ingredients = self.key_ingredients()
            blob = json.dumps(self._ingredients, sort_keys=True, default=str).encode()
            self._key = hashlib.blake2b(blob, digest_size=10).hexdigest()
        return self._key

    def entry_path(self) -> Path:
        root = Path(self.config.cache_dir).expanduser() if self.config.cache_dir else default_cache_dir()
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.views.scene_name)[:60] or "scene"
        return root / f"{safe}-{self.cache_key()}"

    # ------------------------------------------------------------------ load / compute
    def prepare(self) -> "FeatureStore":
        """Load the cache entry for the current key, computing it first if absent."""
        from rich.console import Console

        console = Console(stderr=False)
        path = self.entry_path()
        self.path = path
        if not self._try_load(path):
            console.print(f"[bold]MVFM feature cache: miss[/bold] -> computing {path}")
            self._compute(path)
            if not self._try_load(path):
                raise RuntimeError(f"feature cache entry {path} was written but cannot be read back")
        else:
            self.cache_hit = True
            console.print(f"[bold]MVFM feature cache: hit[/bold] {path}")
        return self

    def _try_load(self, path: Path) -> bool:
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            return False
        from safetensors.torch import load_file

        meta = json.loads(meta_path.read_text())
        if meta.get("key") != path.name.rsplit("-", 1)[-1]:
            return False
        feats = np.load(path / "features.npy", mmap_mode="r")
        n, (h, w) = len(self.views), self.grid
        if feats.shape[:3] != (n, h, w) or feats.dtype != np.float16:
            return False
        bases = load_file(str(path / "bases.safetensors"))
        self.features = feats
        self.meta = meta
        self.display_basis = PCABasis.from_state({k[len("display."):]: t for k, t in bases.items() if k.startswith("display.")})
        red = {k[len("reduction."):]: t for k, t in bases.items() if k.startswith("reduction.")}
        self.reduction_basis = PCABasis.from_state(red) if red else None
        return True

    def _build_model(self):
        from . import create_mvfm

        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = create_mvfm(
                c.backbone,
                weights=c.weights,
                tiny=c.tiny,
                adapters=str(Path(c.adapters).expanduser()) if c.adapters is not None else None,
                **self._attention_options(),
            )
        return model.to(self.device).eval()

    def _attention_options(self) -> Dict[str, object]:
        """MVFM runtime attention fields for this grouping ('scene': knn over views_per_set - 1 neighbours)."""
        c = self.config
        if c.kv_pool < 1:
            raise ValueError(f"kv_pool must be >= 1, got {c.kv_pool}")
        if c.view_grouping == "scene":
            return {"attention": "knn", "num_neighbors": max(1, c.views_per_set - 1), "kv_pool": c.kv_pool}
        return {"attention": c.attention, "kv_pool": c.kv_pool}

    def _adapt(self, model, work: Path, image_long_side: int):
        """Per-scene adaptation of ``model``'s adapters in place (mvfm_nerfstudio.training.adapt_to_scene).

        Trains on the scene folder's own views and correspondences (SfM tracks when the folder has a
        COLMAP model, else depth maps), at the feature store's input resolution and set size.
        Returns the model and the adapter checkpoint it wrote.
        """
        from .training import adapt_to_scene

        c, root = self.config, self.views.scene_root
        if root is None:
            raise ValueError("per-scene adaptation (adapt=True) needs the scene directory (ViewSource.scene_root)")
        ckpt = adapt_to_scene(
            str(root),
            model=model,
            steps=c.adapt_steps,
            output_dir=work / "adapt",
            lr=c.adapt_lr,
            weights=c.weights,
            model_seed=c.seed,
            seed=c.seed,
            image_size=image_long_side,
            num_views=c.views_per_set,
            device=self.device.type,
            tensorboard=False,
        )
        return model.eval(), Path(ckpt)

    def _input_size(self, patch: int) -> Tuple[int, int]:
        h, w = self.grid
        return h * patch, w * patch

    def _load_resized(self, i: int, size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image ``i`` resized to ``size`` -> (``[3, H', W']`` float, scaled ``[3, 3]`` intrinsics)."""
        img = self.views.load_image(i)
        if img.dtype == torch.uint8:
            img = img.float() / 255.0
        img = img[..., :3].float()
        hh, ww = (int(x) for x in self.views.image_sizes[i])
        if tuple(img.shape[:2]) != (hh, ww):
            raise ValueError(
                f"image {self.views.image_paths[i]} loaded as {tuple(img.shape[:2])} (HxW) but its camera says "
                f"{(hh, ww)}"
            )
        x = img.permute(2, 0, 1)[None]
        if (hh, ww) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        k = self.views.intrinsics[i].double().clone()
        k[0] *= size[1] / ww
        k[1] *= size[0] / hh
        return x[0].clamp(0, 1), k.float()

    def _compute(self, path: Path) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        c, v = self.config, self.views
        n, (h, w) = len(v), self.grid
        model = self._build_model()
        size = self._input_size(model.patch_size)
        c2w = v.cam_to_world.double()
        if c.multi_view:
            sets = group_views(c2w, c.views_per_set, c.view_grouping, c.max_views_per_pass)
        else:
            sets = [(i,) for i in range(n)]
        d_full = model.feature_dim
        work = path.parent / f".{path.name}.partial-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        try:
            adapted = None
            if c.adapt:
                model, adapted = self._adapt(model, work, max(size))
            # Resized inputs and float32 sums live in memory-mapped scratch files: RAM stays bounded.
            images = np.lib.format.open_memmap(work / "images.npy", "w+", np.uint8, (n, 3, *size))
            intr = torch.empty(n, 3, 3)
            acc = np.lib.format.open_memmap(work / "sum.npy", "w+", np.float32, (n, h, w, d_full))
            counts = np.zeros(n, dtype=np.int64)
            with Progress(*columns) as progress:
                for i in progress.track(range(n), description="MVFM: loading images"):
                    img, intr[i] = self._load_resized(i, size)
                    images[i] = (img * 255).round().to(torch.uint8).numpy()
                batches = [sets[j : j + c.sets_per_batch] for j in range(0, len(sets), c.sets_per_batch)]
                task = progress.add_task(f"MVFM: {len(sets)} sets of {len(sets[0])} views", total=len(sets))
                for batch in batches:
                    idx = torch.tensor(batch)  # [B, S]
                    x = torch.from_numpy(images[idx.flatten().numpy()]).float().div(255).to(self.device)
                    x = x.view(*idx.shape, 3, *size)
                    with torch.inference_mode():
                        if c.multi_view:
                            out = model(x, intr[idx].to(self.device), c2w[idx].float().to(self.device))
                        else:
                            out = model.forward_base(x)
                    self.mvfm_forwards += 1
                    out = out.float().permute(0, 1, 3, 4, 2).cpu().numpy()  # [B, S, h, w, D]
                    for b, s_idx in enumerate(batch):
                        for s, view in enumerate(s_idx):
                            acc[view] += out[b, s]
                            counts[view] += 1
                    progress.advance(task, len(batch))
            for i in range(n):
                acc[i] /= counts[i]
            reduction = None
            if c.feature_dim is not None and c.feature_dim < d_full:
                reduction = fit_pca(self._sample_rows(acc), c.feature_dim, seed=c.seed)
            d_out = reduction.components.shape[0] if reduction is not None else d_full
            path.mkdir(parents=True, exist_ok=True)
            with atomic_path(path / "features.npy") as tmp:
                out_arr = np.lib.format.open_memmap(tmp, "w+", np.float16, (n, h, w, d_out))
                for i in range(n):
                    f = torch.from_numpy(np.asarray(acc[i]))
                    out_arr[i] = (reduction.project(f) if reduction is not None else f).numpy().astype(np.float16)
                out_arr.flush()
                display = fit_pca(self._sample_rows(out_arr), 3, seed=c.seed)
                del out_arr
            self._write_bases(path, display, reduction)
            if adapted is not None:
                with atomic_path(path / "adapters.safetensors") as tmp:
                    shutil.copyfile(adapted, tmp)
            meta = {
                "key": self.cache_key(),
                "format": CACHE_FORMAT_VERSION,
                "num_images": n,
                "grid": [h, w],
                "feature_dim": d_out,
                "backbone_feature_dim": d_full,
                "mvfm_input_size": list(size),
                "view_sets": [list(s) for s in sets],
                "image_names": [Path(p).name for p in v.image_paths],
                "ingredients": self._ingredients,
            }
            atomic_write(path / "meta.json", json.dumps(meta, indent=1).encode())
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _sample_rows(self, arr: np.ndarray) -> torch.Tensor:
        """A deterministic subsample of the ``[N, h, w, D]`` array's feature vectors, ``[M, D]`` float32."""
        flat = arr.reshape(-1, arr.shape[-1])
        total = flat.shape[0]
        if total <= _PCA_FIT_SAMPLES:
            return torch.from_numpy(np.asarray(flat, dtype=np.float32))
        g = torch.Generator().manual_seed(self.config.seed)
        rows = torch.randperm(total, generator=g)[:_PCA_FIT_SAMPLES].sort().values.numpy()
        return torch.from_numpy(np.asarray(flat[rows], dtype=np.float32))

    @staticmethod
    def _write_bases(path: Path, display: PCABasis, reduction: Optional[PCABasis]) -> None:
        from safetensors.torch import save

        tensors = {f"display.{k}": t.contiguous() for k, t in display.state().items()}
        if reduction is not None:
            tensors.update({f"reduction.{k}": t.contiguous() for k, t in reduction.state().items()})
        atomic_write(path / "bases.safetensors", save(tensors))

    # ------------------------------------------------------------------ access
    def _require(self) -> np.ndarray:
        if self.features is None:
            raise RuntimeError("FeatureStore.prepare() has not been called")
        return self.features

    @property
    def feature_dim(self) -> int:
        return int(self._require().shape[-1])

    def __len__(self) -> int:
        return len(self.views)

    def feature_map(self, i: int) -> torch.Tensor:
        """Feature map of view ``i``: ``[h, w, D]`` float32 (spans the whole image, see the module docstring)."""
        return torch.from_numpy(np.asarray(self._require()[i], dtype=np.float32))

    def sample(self, image_indices: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Bilinearly interpolated features at pixel coordinates.

        Args:
            image_indices: ``[R]`` long view indices.
            xy: ``[R, 2]`` pixel coordinates ``(x, y)`` in each view's ``H x W`` image, pixel
                centres at ``(col + 0.5, row + 0.5)``.

        Returns:
            ``[R, D]`` float32 on the CPU.
        """
        feats = self._require()
        n, h, w, d = feats.shape
        idx = image_indices.long().cpu()
        sizes = self.views.image_sizes[idx].double()  # [R, 2] (H, W)
        xy = xy.double().cpu()
        gx = (xy[:, 0] / sizes[:, 1] * w - 0.5).clamp(0, w - 1)
        gy = (xy[:, 1] / sizes[:, 0] * h - 0.5).clamp(0, h - 1)
        x0, y0 = gx.floor().long().clamp(max=w - 1), gy.floor().long().clamp(max=h - 1)
        x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
        fx, fy = (gx - x0).float()[:, None], (gy - y0).float()[:, None]
        flat = feats.reshape(n * h * w, d)
        base = idx * (h * w)
        rows = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0, base + y1 * w + x1])
        uniq, inverse = torch.unique(rows.flatten(), return_inverse=True)
        vals = torch.from_numpy(np.asarray(flat[uniq.numpy()], dtype=np.float32))[inverse].view(4, -1, d)
        top = vals[0] * (1 - fx) + vals[1] * fx
        bottom = vals[2] * (1 - fx) + vals[3] * fx
        return top * (1 - fy) + bottom * fy

    def sample_pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """Features for Nerfstudio-style ray indices ``[R, 3]`` = (image, row, col) -> ``[R, D]`` (pixel centres)."""
        xy = torch.stack([indices[:, 2], indices[:, 1]], dim=-1).double() + 0.5
        return self.sample(indices[:, 0], xy)


def describe(store: FeatureStore) -> str:
    """One-line summary for logs."""
    h, w = store.grid
    state = "hit" if store.cache_hit else f"computed with {store.mvfm_forwards} MVFM passes"
    return f"{len(store)} views, {h}x{w} x {store.feature_dim} features ({state}) at {store.path}"
