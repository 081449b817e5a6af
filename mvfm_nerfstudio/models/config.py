"""MVFM adapter architecture: :class:`MVFMConfig`, and which of its fields are run-time choices.

Besides this package's own design (the defaults), :meth:`MVFMConfig.authors` gives the architecture profile of
the MVFM authors' released models (``Leoseg/*``): the same model class computes what their code computes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

__all__ = ["MVFMConfig", "RUNTIME_FIELDS", "AUTHORS_VARIANTS"]

AUTHORS_VARIANTS = ("dinov2_reg", "dinov2_reg_no_plucker", "dinov3", "clip", "sam")
"""The MVFM authors' released variants (Hugging Face ``Leoseg/<variant>``)."""

# Config fields that change how attention is computed but not the parameters: an adapter
# checkpoint may be run with other values (e.g. trained global, deployed knn).
RUNTIME_FIELDS = ("attention", "num_neighbors", "kv_pool")


@dataclass(frozen=True)
class MVFMConfig:
    """Architecture of the MV-Adapters (everything a checkpoint must match)."""

    adapter_blocks: Optional[Tuple[int, ...]] = None
    """Indices of the transformer blocks followed by an adapter (negative counts from the end); None = every block."""
    share_adapters: bool = False
    """Use one shared adapter for all adapted blocks after the first (the authors' code does this)."""
    adapter_dim: Optional[int] = None
    """Width inside the adapters; None = half the backbone's token width (adapters then cost ~0.3x the
    backbone instead of ~1x; set it to the backbone width to match the paper)."""
    num_heads: int = 8
    """Attention heads in each adapter."""
    mlp_ratio: float = 4.0
    """Hidden width of the adapter MLP relative to adapter_dim; 0 = no MLP (the authors' DINOv3 adapters)."""
    adapter_type: Literal["residual", "authors"] = "residual"
    """'residual': pre-norm attention + MLP blocks with inner residuals at adapter_dim (this package's design);
    'authors': the released models' adapter: LayerNorm (eps 1e-5) -> attention -> MLP (GELU) at the input width,
    no inner residual, then the zero-initialised output projection (adapter_dim must be None)."""
    adapter_pool: int = 1
    """'authors' adapters: max-pool the patch grid by this factor before attention and upsample the result back
    bilinearly (align_corners=True), as the authors' DINOv3 (spatial_reduction=True: 2). 1 = off."""
    adapt_registers: bool = False
    """Register tokens (prefix tokens after CLS) join the adapters' attention and get their correction too
    (the authors' MV-DINOv2); False = only patch tokens are adapted."""
    shared_intrinsics: bool = False
    """Build every view's rays with view 0's intrinsics (the authors' code); False = each view's own."""
    pos_embed_resample: Literal["timm", "dinov2_hub", "bilinear"] = "timm"
    """Backbone position-embedding resampling: 'timm' (bicubic with antialias), 'dinov2_hub' (DINOv2 torch.hub:
    bicubic at (n+0.1)/N without antialias, the authors' MV-DINOv2), 'bilinear' (the authors' MV-SAM)."""
    final_norm: bool = True
    """Apply the backbone's final LayerNorm to the output tokens (the authors' MV-DINOv2 does not); also what
    forward_base returns. SAM ignores it (its neck always runs)."""
    input_size: Optional[Tuple[int, int]] = None
    """(H, W) every image is resized to before the model, aspect ratio not kept (the authors' square resize: 518
    for DINOv2, 512 for the others); tools (feature store, mvfm-eval) honour it. None = keep the aspect ratio."""
    use_rays: bool = True
    """Condition the first adapter on Plücker ray maps; False = pose-free variant (cameras optional)."""
    ray_embed_dim: int = 128
    """Channels of the patchified ray embedding concatenated to the first adapter's input."""
    reference_frame: Literal["mean", "first", "authors"] = "mean"
    """Canonical camera frame: 'mean' (order-independent) or 'first' (view 0's axes), both centred on the geometric
    median with the median camera at distance 2; 'authors' = the released models' recipe (view 0's frame and
    origin, scaled so view 0 is at distance 2 from the inlier mean: geometry.normalize_cameras_first_view)."""
    attention: Literal["global", "knn"] = "global"
    """'global': every view attends to all views (paper); 'knn': each view attends to its num_neighbors closest views."""
    num_neighbors: int = 3
    """Views each view attends to in 'knn' mode, chosen by camera pose (by index without poses)."""
    kv_pool: int = 1
    """Average-pool other views' keys/values by this factor per side (1 = full resolution)."""

    def __post_init__(self) -> None:
        if self.attention not in ("global", "knn"):
            raise ValueError(f"attention must be 'global' or 'knn', got {self.attention!r}")
        if self.reference_frame not in ("mean", "first", "authors"):
            raise ValueError(f"reference_frame must be 'mean', 'first' or 'authors', got {self.reference_frame!r}")
        if self.num_neighbors < 1 or self.kv_pool < 1 or self.num_heads < 1 or self.mlp_ratio < 0:
            raise ValueError("num_neighbors, kv_pool and num_heads must be >= 1 and mlp_ratio >= 0")
        if self.adapter_type not in ("residual", "authors"):
            raise ValueError(f"adapter_type must be 'residual' or 'authors', got {self.adapter_type!r}")
        if self.adapter_type == "authors" and self.adapter_dim is not None:
            raise ValueError("adapter_type='authors' adapters work at the input width: leave adapter_dim=None")
        if self.adapter_pool < 1 or (self.adapter_pool > 1 and self.adapter_type != "authors"):
            raise ValueError("adapter_pool must be >= 1, and > 1 only with adapter_type='authors'")
        if self.pos_embed_resample not in ("timm", "dinov2_hub", "bilinear"):
            raise ValueError(f"pos_embed_resample must be 'timm', 'dinov2_hub' or 'bilinear', got {self.pos_embed_resample!r}")
        if self.adapter_blocks is not None:
            object.__setattr__(self, "adapter_blocks", tuple(int(i) for i in self.adapter_blocks))
        if self.input_size is not None:
            size = tuple(int(v) for v in self.input_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"input_size must be (H, W) in pixels, got {self.input_size!r}")
            object.__setattr__(self, "input_size", size)

    @classmethod
    def authors(cls, variant: str = "dinov2_reg", **overrides) -> "MVFMConfig":
        """The architecture profile of the MVFM authors' released model ``variant`` (:data:`AUTHORS_VARIANTS`).

        Common to all: an 'authors' adapter after every block, one module shared by blocks 2..L, 8 heads, FFN 4x,
        Plücker rays (6 -> 128 conv patch embedding, concatenated at the first adapter only) in the authors'
        camera frame with view 0's intrinsics for all views, a square input. Per variant:

        ===================== ====== ===== ========= ========== =========== ====== =========
        variant               rays   FFN   grid pool registers  pos. embed  norm   input
        ===================== ====== ===== ========= ========== =========== ====== =========
        dinov2_reg            yes    yes   1         adapted    dinov2_hub  no     518x518
        dinov2_reg_no_plucker no     yes   1         adapted    dinov2_hub  no     518x518
        dinov3                yes    no    2 (max)   not        RoPE        yes    512x512
        clip                  yes    yes   1         (none)     timm        yes    512x512
        sam                   yes    yes   1         (none)     bilinear    neck   512x512
        ===================== ====== ===== ========= ========== =========== ====== =========

        ``overrides`` replace fields (e.g. run-time ``attention="knn"``).
        """
        if variant not in AUTHORS_VARIANTS:
            raise ValueError(f"unknown authors' variant {variant!r}; one of {', '.join(AUTHORS_VARIANTS)}")
        dinov2 = variant.startswith("dinov2")
        fields: Dict[str, object] = dict(
            adapter_blocks=None, share_adapters=True, adapter_dim=None, num_heads=8, mlp_ratio=4.0,
            adapter_type="authors", use_rays=variant != "dinov2_reg_no_plucker", ray_embed_dim=128,
            reference_frame="authors", shared_intrinsics=True, adapt_registers=dinov2,
            pos_embed_resample={"sam": "bilinear"}.get(variant, "dinov2_hub" if dinov2 else "timm"),
            final_norm=not dinov2, input_size=(518, 518) if dinov2 else (512, 512),
        )
        if variant == "dinov3":
            fields.update(mlp_ratio=0.0, adapter_pool=2)
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> Dict[str, object]:
        d = dataclasses.asdict(self)
        if d["adapter_blocks"] is not None:
            d["adapter_blocks"] = list(d["adapter_blocks"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "MVFMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MVFM config fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
