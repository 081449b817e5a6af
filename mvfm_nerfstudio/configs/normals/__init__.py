"""Presets of ``mvfm-normals train`` (YAML)."""
