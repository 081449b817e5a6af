"""Packaged presets (YAML) of the command-line tools; see mvfm_nerfstudio.training.config and
mvfm_nerfstudio.probes.config. Presets are read with :mod:`importlib.resources`, so wheels have them too."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Dict

import yaml

__all__ = ["preset_files", "read_preset", "config_fields_to_dict", "check_config_keys"]


def preset_files(package: str) -> Dict[str, object]:
    """``{name: resource}`` of the ``*.yaml`` presets in the package ``package`` (e.g. ``configs.train``)."""
    folder = resources.files(package)
    return {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def read_preset(package: str, name_or_path: str, what: str) -> Dict[str, Any]:
    """The dict of a preset: a name of the package's presets (:func:`preset_files`) or a YAML/JSON file path; its
    ``description`` key removed. ``what`` names the presets in the error (``"training preset"``)."""
    path = Path(name_or_path)
    if path.is_file():
        text, suffix = path.read_text(), path.suffix
    else:
        presets = preset_files(package)
        if name_or_path not in presets:
            raise ValueError(f"unknown {what} {name_or_path!r}: not a file and not one of {sorted(presets)}")
        text, suffix = presets[name_or_path].read_text(), ".yaml"
    data = (json.loads(text) if suffix == ".json" else yaml.safe_load(text)) or {}
    data.pop("description", None)
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(x) for x in value]
    if isinstance(value, dict):
        return {k: _plain(x) for k, x in value.items()}
    return value


def config_fields_to_dict(config: Any) -> Dict[str, Any]:
    """JSON-able dict of a config dataclass's fields (paths as strings, tuples as lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def check_config_keys(d: Dict[str, Any], config_class: type, what: str) -> None:
    """Raise ValueError naming the keys of ``d`` that are not fields of the dataclass ``config_class`` (``what``
    names the config in the message, e.g. ``"training"``)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} config keys {unknown}; known keys: {sorted(known)}")
