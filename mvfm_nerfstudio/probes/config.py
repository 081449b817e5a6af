"""Configuration of ``mvfm-normals train`` / ``eval`` and the training presets (package data in
``mvfm_nerfstudio/configs/normals/*.yaml``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple

from ..configs import check_config_keys, config_fields_to_dict, preset_files, read_preset
from ..geometry.normals import DEFAULT_MAX_REL_JUMP
from ..models.build import ModelSpec
from .normals import FRAMES

__all__ = ["NormalsTrainConfig", "NormalsEvalConfig", "list_normals_presets", "load_normals_preset",
           "normals_config_to_dict", "normals_config_from_dict", "FRAMES"]

_PRESET_PACKAGE = "mvfm_nerfstudio.configs.normals"


@dataclass
class NormalsTrainConfig(ModelSpec):
    """Train a surface-normal probe (multi-view DPT head) on frozen base or MVFM features of one scene.

    Views are split by ``holdout_every`` into train / held-out; the head only sees sets of training views.
    Features are computed once (frozen), the head is trained with AdamW, and at the end it is evaluated on
    the held-out views (metrics.json, PNGs), as ``mvfm-normals eval`` does.
    """

    scene: Path = Path("data/scene")
    """Scene folder with ground-truth normals: normal files (mvfm-make-scene) or depth maps (depth_file_path)."""
    output_dir: Path = Path("outputs/mvfm-normals")
    """Run folder: head.safetensors, checkpoints/, tensorboard/, config.json, eval/."""
    features: Literal["base", "mvfm"] = "mvfm"
    """Which frozen features the head reads: the base model's or the MVFM's (with --adapters; untrained
    adapters reproduce the base model)."""
    frame: Literal["camera", "world", "reference"] = "camera"
    """Frame of the predicted normals: each view's camera frame, the scene's world frame, or the camera frame
    of the set's first view ('reference', the frame MVFM features are expressed in)."""
    image_size: int = 224
    """Long image side in pixels (rounded to the patch size; aspect ratio kept)."""
    num_views: int = 4
    """Views per set (S) the head sees together."""
    holdout_every: int = 8
    """Hold out every k-th view (views 0, k, 2k, ...) for evaluation."""
    layers: Optional[Tuple[int, ...]] = None
    """Backbone blocks whose tokens the head reads (negative = from the end); None = 4 evenly spaced ending at
    the last block (DPT's choice: 2, 5, 8, 11 for 12 blocks)."""
    hidden_dim: int = 64
    """Channels of the head's fusion stage."""
    num_heads: int = 4
    """Heads of the head's cross-view attention."""
    view_interaction: bool = True
    """Cross-view attention between the views of a set (False: a per-view head)."""
    uncertainty: bool = True
    """Predict a concentration kappa and train with the uncertainty-aware angular loss (else plain angular loss)."""
    steps: int = 300
    """Optimiser steps."""
    batch_sets: int = 2
    """View sets per step."""
    lr: float = 1e-3
    """AdamW learning rate (cosine decay to lr/10)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the head's initialisation and of the per-step set draws (each step's draw depends on seed and step)."""
    normals_source: Literal["auto", "files", "depth"] = "auto"
    """Ground truth: normal files, normals from depth, or 'auto' (files when the scene has them)."""
    max_rel_jump: float = DEFAULT_MAX_REL_JUMP
    """Depth-discontinuity threshold (relative jump between neighbouring pixels) for normals from depth."""
    smooth_radius: int = 3
    """Normals from depth are averaged over a (2r+1)^2 window at the depth resolution (sensor noise); 0 = off."""
    checkpoint_every: int = 100
    """Write head + optimiser state every N steps (and at the end)."""
    log_every: int = 10
    """TensorBoard scalars every N steps."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    evaluate: bool = True
    """Evaluate on the held-out views at the end (output_dir/eval)."""
    num_threads: int = 0
    """Torch CPU threads (0 = leave torch's setting)."""
    tensorboard: bool = True
    """Write TensorBoard scalars to output_dir/tensorboard."""
    progress: bool = True
    """Show a progress bar."""


@dataclass
class NormalsEvalConfig:
    """Evaluate a trained normal probe on the held-out views of a scene (metrics.json, normal and error PNGs).

    Backbone, weights, adapters, features, frame, resolution and split come from the head checkpoint.
    """

    head: Path = Path("outputs/mvfm-normals/head.safetensors")
    """Head checkpoint written by `mvfm-normals train`."""
    scene: Optional[Path] = None
    """Scene to evaluate on; default: the one the head was trained on."""
    output_dir: Optional[Path] = None
    """Where metrics.json and the PNGs go; default: eval/ beside the checkpoint."""
    device: Optional[str] = None
    """Device ('cpu', 'cuda', ...); default: the training run's."""
    max_images: int = 8
    """Held-out views written as PNGs (predicted, ground truth, error map); 0 = none."""
    num_threads: int = 0
    """Torch CPU threads (0 = leave torch's setting)."""
    progress: bool = True
    """Show a progress bar."""


def normals_config_to_dict(config: NormalsTrainConfig) -> Dict[str, Any]:
    """JSON-able dict of a :class:`NormalsTrainConfig`."""
    return config_fields_to_dict(config)


def normals_config_from_dict(d: Dict[str, Any], base: Optional[NormalsTrainConfig] = None) -> NormalsTrainConfig:
    """A :class:`NormalsTrainConfig` from a (partial) dict on top of ``base``; unknown keys are named."""
    base = base or NormalsTrainConfig()
    check_config_keys(d, NormalsTrainConfig, "mvfm-normals")
    updates: Dict[str, Any] = {}
    for key, value in d.items():
        if key in ("scene", "output_dir"):
            updates[key] = Path(value)
        elif key == "layers":
            updates[key] = None if value is None else tuple(int(x) for x in value)
        elif key == "adapters":
            updates[key] = None if value is None else str(value)
        else:
            updates[key] = value
    return dataclasses.replace(base, **updates)


def list_normals_presets() -> List[str]:
    """Names of the shipped ``mvfm-normals train`` presets."""
    return sorted(preset_files(_PRESET_PACKAGE))


def load_normals_preset(name_or_path: str) -> NormalsTrainConfig:
    """A :class:`NormalsTrainConfig` from a preset name (:func:`list_normals_presets`) or a YAML/JSON path."""
    data = read_preset(_PRESET_PACKAGE, name_or_path, "mvfm-normals preset")
    return normals_config_from_dict(data)
