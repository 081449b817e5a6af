"""MVFM adapter architecture: :class:`MVFMConfig`, and which of its fields are run-time choices."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, Literal, Optional, Tuple

__all__ = ["MVFMConfig", "RUNTIME_FIELDS"]

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
    """Hidden width of the adapter MLP relative to adapter_dim."""
    use_rays: bool = True
    """Condition the first adapter on Plücker ray maps; False = pose-free variant (cameras optional)."""
    ray_embed_dim: int = 128
    """Channels of the patchified ray embedding concatenated to the first adapter's input."""
    reference_frame: Literal["mean", "first"] = "mean"
    """Canonical camera frame: 'mean' (order-independent) or 'first' (view 0, as in the paper)."""
    attention: Literal["global", "knn"] = "global"
    """'global': every view attends to all views (paper); 'knn': each view attends to its num_neighbors closest views."""
    num_neighbors: int = 3
    """Views each view attends to in 'knn' mode, chosen by camera pose (by index without poses)."""
    kv_pool: int = 1
    """Average-pool other views' keys/values by this factor per side (1 = full resolution)."""

    def __post_init__(self) -> None:
        if self.attention not in ("global", "knn"):
            raise ValueError(f"attention must be 'global' or 'knn', got {self.attention!r}")
        if self.reference_frame not in ("mean", "first"):
            raise ValueError(f"reference_frame must be 'mean' or 'first', got {self.reference_frame!r}")
        if self.num_neighbors < 1 or self.kv_pool < 1 or self.num_heads < 1 or self.mlp_ratio <= 0:
            raise ValueError("num_neighbors, kv_pool and num_heads must be >= 1 and mlp_ratio > 0")
        if self.adapter_blocks is not None:
            object.__setattr__(self, "adapter_blocks", tuple(int(i) for i in self.adapter_blocks))

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
