"""Load a trained ``mvfm-features`` / ``mvfm-splat`` run from its ``config.yml`` (checkpoint, feature cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from ..utils.runtime import DeviceLike, resolve_device

__all__ = ["METHODS", "LoadedRun", "RunError", "load_run"]

METHODS = ("mvfm-features", "mvfm-splat")
"""The Nerfstudio methods whose runs :func:`load_run` opens."""


class RunError(ValueError):
    """A run cannot be opened or exported: missing config or checkpoint, another method, missing scene data."""


@dataclass
class LoadedRun:
    """A trained run, ready to render (model in eval mode).

    Attributes:
        config_path: the run's ``config.yml``.
        config: the Nerfstudio ``TrainerConfig`` read from it.
        pipeline: the set-up pipeline with the checkpoint loaded; its datamanager holds the run's
            :class:`~mvfm_nerfstudio.feature_store.FeatureStore` (loaded from the feature cache).
        method: ``"mvfm-features"`` or ``"mvfm-splat"``.
        checkpoint: the ``step-*.ckpt`` file loaded.
        step: its training step.
    """

    config_path: Path
    config: object
    pipeline: object
    method: Literal["mvfm-features", "mvfm-splat"]
    checkpoint: Path
    step: int

    @property
    def model(self):
        """The MVFM model (``MVFMFeaturesModel`` or ``MVFMSplatModel``)."""
        return self.pipeline.model

    @property
    def feature_store(self):
        """The training views' cached MVFM features (:class:`~mvfm_nerfstudio.feature_store.FeatureStore`)."""
        return self.pipeline.datamanager.feature_store

    @property
    def train_cameras(self):
        """Nerfstudio ``Cameras`` ``[N]`` of the training views (the model's world frame)."""
        return self.pipeline.datamanager.train_dataset.cameras

    @property
    def train_image_names(self):
        """File names of the training images, in camera order."""
        return [Path(p).name for p in self.pipeline.datamanager.train_dataset.image_filenames]

    @property
    def is_splat(self) -> bool:
        return self.method == "mvfm-splat"


def _latest_checkpoint(model_dir: Path, config_path: Path) -> Path:
    ckpts = sorted(model_dir.glob("step-*.ckpt"), key=lambda p: int(p.stem.split("-")[-1]))
    if not ckpts:
        raise RunError(f"the run {config_path} has no checkpoint (no step-*.ckpt in {model_dir}): train it longer "
                       "than --steps-per-save iterations, or point --load-config at a run that saved one")
    return ckpts[-1]


def load_run(config_path: Path, device: DeviceLike = "auto", data: Optional[Path] = None) -> LoadedRun:
    """Set up a trained run's pipeline from ``config.yml`` and load its latest checkpoint.

    The datamanager is built in Nerfstudio's ``test`` mode (training + evaluation images, as loaded for
    training), so the feature store finds the run's feature-cache entry (``ns-export``'s ``inference`` mode
    changes the images' downscale factor and would miss it). ``config.yml`` is a Nerfstudio config, which
    constructs Python objects when read (as ``ns-viewer`` does): open only runs you trust. The checkpoint is
    read with ``torch.load(weights_only=True)``.

    Args:
        config_path: the run's ``config.yml`` (``outputs/<experiment>/<method>/<timestamp>/config.yml``).
        device: where to render (see :mod:`mvfm_nerfstudio.utils.runtime`).
        data: the scene folder, when it moved since training (default: the path stored in the config).

    Raises:
        RunError: no such file, not a Nerfstudio config of an MVFM method, no checkpoint, scene data missing.
    """
    import yaml
    from nerfstudio.engine.trainer import TrainerConfig

    config_path = Path(config_path)
    if config_path.is_dir():
        config_path = config_path / "config.yml"
    if not config_path.is_file():
        raise RunError(f"run config {config_path} does not exist: pass the config.yml of a trained run "
                       "(outputs/<experiment>/<method>/<timestamp>/config.yml)")
    try:
        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)  # a Nerfstudio config (see the docstring)
    except yaml.YAMLError as exc:
        raise RunError(f"{config_path} is not a readable Nerfstudio config.yml: {exc}") from exc
    if not isinstance(config, TrainerConfig):
        raise RunError(f"{config_path} is not a Nerfstudio run config (got {type(config).__name__})")
    if config.method_name not in METHODS:
        raise RunError(f"{config_path} is a {config.method_name!r} run; mvfm-export needs {' or '.join(METHODS)}")
    dm = config.pipeline.datamanager
    if data is not None:
        dm.data = Path(data)
        dm.dataparser.data = Path(data)
    scene = dm.dataparser.data if dm.dataparser.data is not None else dm.data
    if scene is None or not Path(scene).exists():
        raise RunError(f"the scene data {scene} of run {config_path} does not exist (relative paths are relative to "
                       "where you trained): run from that directory or pass --data path/to/scene")
    # the checkpoints sit beside config.yml, wherever the run folder is now
    checkpoint = _latest_checkpoint(config_path.parent / config.relative_model_dir, config_path)
    config.load_dir = checkpoint.parent

    dev = resolve_device(device)
    pipeline = config.pipeline.setup(device=dev, test_mode="test")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    pipeline.load_pipeline(state["pipeline"], int(state["step"]))
    pipeline.eval()
    return LoadedRun(config_path, config, pipeline, config.method_name, checkpoint, int(state["step"]))
