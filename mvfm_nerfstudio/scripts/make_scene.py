"""``mvfm-make-scene``: render a procedural multi-view scene with exact depth in Nerfstudio format."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tyro

from mvfm_nerfstudio.data.generator import SceneGeneratorConfig


@dataclass
class MakeSceneArgs(SceneGeneratorConfig):
    """Render textured objects on a ground plane from an orbit of cameras: RGB, exact z-depth (16-bit PNG),
    object ids, transforms.json (Nerfstudio) and optionally a COLMAP model with exact tracks."""

    output_dir: Path = Path("outputs/procedural_scene")
    """Folder to write the scene into (created; must be empty unless --overwrite)."""


def main(args: MakeSceneArgs) -> Path:
    from rich.console import Console

    from mvfm_nerfstudio.data import load_scene
    from mvfm_nerfstudio.data.generator import make_scene

    console = Console()
    config = SceneGeneratorConfig(**{k: v for k, v in asdict(args).items() if k != "output_dir"})
    start = time.perf_counter()
    out = make_scene(config, args.output_dir)
    scene = load_scene(out)
    tracks = f", {scene.tracks.num_points} COLMAP tracks" if scene.tracks is not None else ""
    console.print(
        f"[green]Wrote {len(scene)} views of {config.width}x{config.height} with depth and object ids{tracks} "
        f"to {out} in {time.perf_counter() - start:.1f} s[/green]\n"
        f"Train on it with: ns-train nerfacto --data {out} (depth: ns-train depth-nerfacto --data {out})"
    )
    return out


def entrypoint() -> None:
    main(tyro.cli(MakeSceneArgs))


if __name__ == "__main__":
    entrypoint()
