"""Shared helpers for the training / evaluation / DDP tests: one generated scene per session, tiny configs."""

from __future__ import annotations

import fcntl
from pathlib import Path

from mvfm_nerfstudio.training.config import TrainConfig, config_from_dict, load_preset

SCENE_VIEWS = 16


def generated_scene(root: Path) -> Path:
    """A 16-view procedural scene (96x128, exact COLMAP tracks), generated once under ``root``."""
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    path = root / f"mvfm_gen_scene_{SCENE_VIEWS}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".mvfm_gen_scene.lock", "w") as lock:  # pytest-xdist safe
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "transforms.json").is_file():
            make_scene(tiny_config(seed=0, num_views=SCENE_VIEWS), path, progress=False)
    return path


def tiny_config(scene: Path, output_dir: Path, **overrides) -> TrainConfig:
    """The tiny-test preset on ``scene``: every 4th view held out, no tensorboard/progress output."""
    base = dict(scenes=[str(scene)], output_dir=str(output_dir), holdout_every=4, progress=False, tensorboard=False)
    base.update(overrides)
    return config_from_dict(base, base=load_preset("tiny-test"))
