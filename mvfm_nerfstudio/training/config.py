"""Training configuration (``mvfm-train``) and its named presets.

Presets are package data (``mvfm_nerfstudio/configs/train/*.yaml``), read with
:mod:`importlib.resources`, so they exist in wheel installs as in a source checkout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

from ..configs import check_config_keys, config_fields_to_dict, preset_files, read_preset
from ..models.build import ModelSpec
from ..models.config import MVFMConfig

__all__ = ["TrainConfig", "RUN_TIME_FIELDS", "list_presets", "load_preset", "config_to_dict", "config_from_dict",
           "config_differences"]

_PRESET_PACKAGE = "mvfm_nerfstudio.configs.train"


@dataclass
class TrainConfig(ModelSpec):
    """Train MV-Adapters on the ground-truth correspondences of posed scenes.

    Losses (METHOD.md): dense soft-argmax location loss + ``reg_weight`` x keep-the-base
    regulariser (+ optional InfoNCE). AdamW, fp32 on CPU. Views of every scene are split into
    train / held-out (every ``holdout_every``-th view); training only sees sets of train views.
    """

    scenes: Tuple[Path, ...] = ()
    """Scene folders (transforms.json and/or a COLMAP model with tracks, or depth maps)."""
    output_dir: Path = Path("outputs/mvfm-train")
    """Run folder: adapters.safetensors, checkpoints/, tensorboard/, config.json."""
    mvfm: MVFMConfig = field(default_factory=MVFMConfig)
    """Adapter architecture."""
    image_size: int = 224
    """Long image side in pixels (rounded to the patch size; aspect ratio kept)."""
    num_views: int = 4
    """Views per set (S)."""
    min_shared: int = 64
    """A set is valid only if each view shares at least this many correspondences with another view of the set."""
    pool_sets: int = 256
    """View sets (with correspondences) precomputed per scene; steps draw from this pool."""
    batch_sets: int = 1
    """View sets per step and process (global batch = batch_sets x world size)."""
    num_correspondences: int = 256
    """Correspondences per set and step (subsampled at random)."""
    holdout_every: int = 8
    """Hold out every k-th view of each scene (0 = use all views for training)."""
    steps: int = 1000
    """Optimiser steps."""
    lr: float = 1e-4
    """AdamW learning rate (peak)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    min_lr_ratio: float = 0.1
    """Final learning rate / lr for the cosine schedule."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    temperature: float = 0.02
    """Softmax temperature of the soft-argmax location loss."""
    reg_weight: float = 0.1
    """Weight of the keep-the-base regulariser."""
    nce_weight: float = 0.0
    """Weight of the InfoNCE loss (0 = off, as in the paper)."""
    nce_temperature: float = 0.07
    """InfoNCE temperature."""
    seed: int = 0
    """Seed of view-set pools and per-step sampling (each step's draw depends only on seed and step)."""
    checkpoint_every: int = 500
    """Write adapters + optimiser state every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Keep only the newest N checkpoints (0 = keep all)."""
    log_every: int = 10
    """Log scalars to tensorboard every N steps."""
    eval_every: int = 0
    """Evaluate held-out Loc. Err. every N steps (0 = only at the end)."""
    eval_sets: int = 16
    """Held-out view sets per scene for evaluation during training."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir that verifies (bit-exact with an uninterrupted run on CPU).
    The stored configuration must match this one (run-time fields such as device, threads and logging may differ)."""
    overwrite: bool = False
    """Start afresh in a non-empty output_dir, deleting the earlier run's outputs (adapters, config, metrics,
    checkpoints, tensorboard). Without it (or --resume) a non-empty output_dir is refused."""
    num_threads: int = 0
    """Torch CPU threads per process while training (0 = leave torch's setting). On a busy machine fewer
    threads can be much faster."""
    tensorboard: bool = True
    """Write tensorboard scalars to output_dir/tensorboard."""
    progress: bool = True
    """Show a rich progress bar."""


def config_to_dict(config: TrainConfig) -> Dict[str, Any]:
    """JSON-able dict of a :class:`TrainConfig` (paths as strings, tuples as lists)."""
    d = config_fields_to_dict(config)
    d["mvfm"] = config.mvfm.to_dict()
    return d


_PATH_FIELDS = {"output_dir"}

RUN_TIME_FIELDS = ("device", "num_threads", "progress", "tensorboard", "resume", "overwrite", "output_dir",
                   "eval_every", "eval_sets", "log_every", "checkpoint_every", "keep_checkpoints")
"""Fields a resumed run may change: they do not change what is trained (``steps`` too, with a constant schedule)."""


def config_differences(stored: Dict[str, Any], config: TrainConfig) -> List[str]:
    """``field: stored -> current`` for each field of ``stored`` (a :func:`config_to_dict`) that ``config`` changes,
    ignoring :data:`RUN_TIME_FIELDS` (and ``steps`` when the schedule is constant)."""
    current = config_to_dict(config)
    constant = config.lr_schedule == "constant"  # its learning rates do not depend on steps
    allowed = set(RUN_TIME_FIELDS) | ({"steps"} if constant else set())
    out = []
    for key in sorted(set(stored) | set(current)):
        if key in allowed or key not in stored or key not in current:  # a field added later: its default applies
            continue
        if stored[key] != current[key]:
            out.append(f"{key}: {stored[key]!r} -> {current[key]!r}")
    return out


def config_from_dict(d: Dict[str, Any], base: Optional[TrainConfig] = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a (partial) dict, on top of ``base`` (default: the defaults).

    Raises:
        ValueError: unknown keys (named).
    """
    base = base or TrainConfig()
    check_config_keys(d, TrainConfig, "training")
    updates: Dict[str, Any] = {}
    for key, value in d.items():
        if key == "mvfm":
            merged = {**base.mvfm.to_dict(), **(value or {})}
            updates[key] = MVFMConfig.from_dict(merged)
        elif key == "scenes":
            updates[key] = tuple(Path(p) for p in (value or ()))
        elif key in _PATH_FIELDS:
            updates[key] = None if value is None else Path(value)
        elif key == "adapters":
            updates[key] = None if value is None else str(value)
        else:
            updates[key] = value
    return dataclasses.replace(base, **updates)


def _preset_files() -> Dict[str, Any]:
    return preset_files(_PRESET_PACKAGE)


def list_presets() -> List[str]:
    """Names of the presets shipped with the package (``mvfm_nerfstudio/configs/train/*.yaml``)."""
    return sorted(_preset_files())


def load_preset(name_or_path: str) -> TrainConfig:
    """A :class:`TrainConfig` from a preset name (see :func:`list_presets`) or a YAML/JSON file path."""
    data = read_preset(_PRESET_PACKAGE, name_or_path, "training preset")
    return config_from_dict(data)
