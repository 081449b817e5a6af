"""What the feature store extracts (:class:`FeatureStoreConfig`) and from which views (:class:`ViewSource`)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional

import torch

from ..models.build import ModelSpec

__all__ = ["FeatureStoreConfig", "ViewSource", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$MVFM_CACHE_DIR``, else ``$XDG_CACHE_HOME/mvfm_nerfstudio/features`` (``~/.cache/...``)."""
    if os.environ.get("MVFM_CACHE_DIR"):
        return Path(os.environ["MVFM_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "mvfm_nerfstudio" / "features"


@dataclass
class FeatureStoreConfig(ModelSpec):
    """Which MVFM features supervise the scene, and where they are cached.

    The model options (backbone, weights, tiny, adapters, model seed, device) are those of
    :class:`~mvfm_nerfstudio.models.build.ModelSpec`; the model seed also seeds the PCA subsampling and
    per-scene adaptation. Device 'auto' means the device of the Nerfstudio trainer (or of the caller).
    """

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
    shorter side keeps the first image's aspect ratio, rounded to whole patches). Cost grows with its square.
    Unused with a model whose architecture fixes its input (the published models: a square 518 or 512 px)."""
    feature_dim: Optional[int] = 64
    """Reduce cached features to this many channels with PCA (basis saved in the cache); None = keep all of the
    backbone's channels (384 for ViT-S)."""
    cache_dir: Optional[Path] = None
    """Feature cache directory; None = $MVFM_CACHE_DIR or ~/.cache/mvfm_nerfstudio/features."""
    sets_per_batch: int = 1
    """View sets per MVFM forward pass (more = faster on GPU, more memory)."""
    text_space: bool = False
    """Features in CLIP's joint image-text space, so text queries work (mvfm-segment --text, the viewer's text box):
    the backbone's last block runs its value path only (MaskCLIP) and CLIP's image projection maps every patch
    token (512 channels for clip_vitb16). Backbones with a CLIP text tower only (clip_vitb16); see
    docs/text_queries.md. Keep feature_dim None (or large): text relevancy is computed on the cached channels."""
    adapt: bool = False
    """Adapt the MV-Adapters to this scene before extraction (self-supervised with the scene's SfM tracks when
    available, else its depth maps), reusing mvfm_nerfstudio.training."""
    adapt_steps: int = 100
    """Optimisation steps of per-scene adaptation."""
    adapt_lr: float = 5e-4
    """Peak learning rate of per-scene adaptation (AdamW; other settings from the training preset
    'scene-adapt-cpu')."""

    def key_fields(self) -> Dict[str, object]:
        """The options that change the features (device, cache_dir and batching do not; weights and adapters are
        keyed by their file contents, see :mod:`.cache`)."""
        d = asdict(self)
        for k in ("cache_dir", "sets_per_batch", "device", "adapters", "weights"):
            d.pop(k)
        d["seed"] = d.pop("model_seed")  # the option's earlier name: keys of existing entries stay valid
        if not self.adapt:
            d.pop("adapt_steps"), d.pop("adapt_lr")
        if self.view_grouping != "scene":
            d.pop("max_views_per_pass")
        if self.kv_pool == 1:
            d.pop("kv_pool")  # keys of entries made before the option existed stay valid
        if not self.bf16:
            d.pop("bf16")  # likewise
        if not self.text_space:
            d.pop("text_space")  # likewise
        return d

    def attention_options(self) -> Dict[str, object]:
        """MVFM run-time attention fields for this grouping ('scene': knn over views_per_set - 1 neighbours)."""
        if self.kv_pool < 1:
            raise ValueError(f"kv_pool must be >= 1, got {self.kv_pool}")
        if self.view_grouping == "scene":
            return {"attention": "knn", "num_neighbors": max(1, self.views_per_set - 1), "kv_pool": self.kv_pool}
        return {"attention": self.attention, "kv_pool": self.kv_pool}


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

    @classmethod
    def from_scene(cls, scene) -> "ViewSource":
        """All views of a :class:`~mvfm_nerfstudio.data.scene.PosedScene` (``data.load_scene``), as ``mvfm-segment``
        and ``mvfm-extract --views scene`` see them (undistorted pixels when the scene has distortion)."""
        extra = {}
        if scene.distortion is not None:
            extra["undistorted"] = scene.distortion.round(decimals=6).tolist()
        return cls(
            image_paths=list(scene.image_paths), image_sizes=scene.image_sizes, intrinsics=scene.intrinsics,
            cam_to_world=scene.cam_to_world, load_image=lambda i: scene.load_image(i).permute(1, 2, 0),
            extra_key=extra, scene_name=scene.name, scene_root=scene.root,
        )
