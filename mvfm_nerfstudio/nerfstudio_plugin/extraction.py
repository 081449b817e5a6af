"""``mvfm-extract``: fill the feature cache for a scene ahead of training, in one process or sharded with torchrun.

The views are those ``ns-train mvfm-features`` trains on (``--views mvfm-features``: Nerfstudio's dataparser
with its default options, the training split) or all views of the scene as ``mvfm-segment`` reads them
(``--views scene``); the entry is the one those tools then load (a cache hit). Under
``torchrun --nproc-per-node K`` the scene's view sets (for ``view_grouping="scene"``: its pose-compact chunks of at
most ``max_views_per_pass`` views) are dealt to the K processes and rank 0 writes one entry, the same as a
single process writes (:mod:`mvfm_nerfstudio.feature_store.extract`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..data.readers import load_scene
from ..feature_store import FeatureStore, FeatureStoreConfig, ViewSource, describe
from ..utils.runtime import join_torchrun, resolve_device

__all__ = ["ExtractConfig", "extract_features"]


@dataclass
class ExtractConfig:
    """Compute (or find) the MVFM feature cache entry of a scene."""

    scene: Path
    """Scene folder (Nerfstudio transforms.json; with --views scene anything mvfm_nerfstudio.data.load_scene reads)."""
    views: Literal["mvfm-features", "scene"] = "mvfm-features"
    """Which views: 'mvfm-features' = the training split ns-train mvfm-features uses (Nerfstudio's dataparser,
    default options), so its run hits this entry; 'scene' = every view, as mvfm-segment reads them."""
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    """Extraction options: give the same values as to ns-train's --pipeline.datamanager.features.* (or
    mvfm-segment's --features.*) so that tool finds the entry."""


def _views(config: ExtractConfig) -> ViewSource:
    if config.views == "scene":
        return ViewSource.from_scene(load_scene(config.scene))
    from .datamanager import MVFMDataManagerConfig, training_view_source

    if not (Path(config.scene) / "transforms.json").is_file():
        raise FileNotFoundError(f"{config.scene} has no transforms.json: --views mvfm-features needs a Nerfstudio "
                                "scene (or use --views scene for a COLMAP-only folder)")
    return training_view_source(MVFMDataManagerConfig(data=Path(config.scene), features=config.features))


def extract_features(config: ExtractConfig) -> FeatureStore:
    """Prepare the scene's entry (joins torchrun's process group when started by it); returns the store."""
    import torch.distributed as dist

    device = resolve_device(config.features.device)
    features = dataclasses.replace(config.features, device=str(device))
    joined = join_torchrun(device)
    try:
        store = FeatureStore(features, _views(dataclasses.replace(config, features=features))).prepare()
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"MVFM features: {describe(store)}", flush=True)
        return store
    finally:
        if joined:
            dist.destroy_process_group()
