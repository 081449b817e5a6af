"""Per-scene adaptation: train MV-Adapters on one scene's own training views and its SfM tracks (or depth).

For scenes no pretrained adapter has seen (e.g. inside the Nerfstudio datamanager)::

    from mvfm_nerfstudio.training import adapt_to_scene
    ckpt = adapt_to_scene("data/my_scene", steps=300, output_dir="outputs/adapt/my_scene",
                          backbone="dinov2_vits14_reg", weights="pretrained")
    model = create_mvfm("dinov2_vits14_reg", weights="pretrained", adapters=ckpt)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

from ..data.scene_data import SceneLike
from ..models.mvfm import MultiViewFoundationModel
from .config import TrainConfig, config_from_dict, load_preset
from .trainer import Trainer

__all__ = ["adapt_to_scene", "DEFAULT_ADAPT_PRESET"]

DEFAULT_ADAPT_PRESET = "scene-adapt-cpu"


def adapt_to_scene(
    scene: SceneLike,
    model: Optional[MultiViewFoundationModel] = None,
    config: Optional[Union[TrainConfig, str]] = None,
    steps: Optional[int] = None,
    output_dir: Optional[Union[str, Path]] = None,
    single_process: bool = False,
    **overrides,
) -> Path:
    """Adapt an MVFM to one scene and return the adapter checkpoint path.

    Args:
        scene: a :class:`~mvfm_nerfstudio.data.PosedScene` or a scene folder. Its views are split
            into train / held-out (``holdout_every``); only training views and their
            correspondences (SfM tracks, else depth) are used.
        model: an MVFM to train in place (e.g. with pretrained adapters loaded); its backbone name,
            test size and adapter architecture override the config's. Default: built from the config.
        config: a :class:`TrainConfig`, or a preset name / YAML path; default: the
            ``scene-adapt-cpu`` preset.
        steps: optimiser steps (overrides the config).
        output_dir: run folder (checkpoints, tensorboard); default ``outputs/adapt/<scene name>``.
        single_process: adapt in this process alone, also inside a distributed job (see :class:`Trainer`).
        **overrides: any other :class:`TrainConfig` field (e.g. ``weights="random"``, ``lr=3e-4``).

    Returns:
        Path of ``adapters.safetensors`` in ``output_dir``.
    """
    if config is None or isinstance(config, str):
        config = load_preset(config or DEFAULT_ADAPT_PRESET)
    updates = dict(overrides)
    if steps is not None:
        updates["steps"] = steps
    if model is not None:
        updates.update(backbone=model.backbone.spec.name, tiny=model.backbone.tiny, mvfm=model.config.to_dict())
    if output_dir is None and "output_dir" not in updates:
        name = getattr(scene, "name", None) or Path(str(scene)).name
        updates["output_dir"] = Path("outputs") / "adapt" / name
    elif output_dir is not None:
        updates["output_dir"] = Path(output_dir)
    config = config_from_dict(updates, base=dataclasses.replace(config, scenes=()))
    return Trainer(config, scenes=[scene], model=model, single_process=single_process).train()
