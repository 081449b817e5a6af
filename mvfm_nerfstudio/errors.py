"""Exception types shared by several layers (weights, checkpoints, scenes).

Errors that belong to one layer live there: :class:`~mvfm_nerfstudio.geometry.cameras.CameraError`,
:class:`~mvfm_nerfstudio.backbones.vit.ImageSizeError`, :class:`~mvfm_nerfstudio.backbones.registry.UnknownBackboneError`.
"""

from __future__ import annotations

__all__ = ["WeightsUnavailableError", "CheckpointMismatchError", "SceneError", "RunFolderError",
           "TrainingDivergedError", "NoTextTowerError"]


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be obtained (offline and not cached, missing file, ...)."""


class CheckpointMismatchError(ValueError):
    """A weights file or adapter checkpoint does not fit the model it is loaded into, or cannot be read."""


class SceneError(ValueError):
    """Raised for invalid scenes: missing/corrupt files, bad poses, mismatched sizes, too few views."""


class RunFolderError(ValueError):
    """An output folder cannot be used as asked: it holds an earlier run (or unrelated files), or a resumed run's
    stored configuration differs from the current one."""


class TrainingDivergedError(RuntimeError):
    """Training produced a non-finite loss or gradient; nothing of that step was written."""


class NoTextTowerError(ValueError):
    """A text query (or text-space features) was asked of a backbone that has no CLIP text tower."""
