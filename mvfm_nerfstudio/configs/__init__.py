"""Packaged presets (YAML) of the command-line tools; see mvfm_nerfstudio.training.config."""
