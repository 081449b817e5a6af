"""Packaged presets (YAML) of the command-line tools; see mvfm_nerfstudio.training.config and
mvfm_nerfstudio.probes.config. Presets are read with :mod:`importlib.resources`, so wheels have them too."""

from __future__ import annotations

from importlib import resources
from typing import Dict

__all__ = ["preset_files"]


def preset_files(package: str) -> Dict[str, object]:
    """``{name: resource}`` of the ``*.yaml`` presets in the package ``package`` (e.g. ``configs.train``)."""
    folder = resources.files(package)
    return {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}
