"""mvfm-train presets (read with importlib.resources by mvfm_nerfstudio.training.config)."""
