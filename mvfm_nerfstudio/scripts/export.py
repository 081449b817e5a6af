"""``mvfm-export``: point clouds, segmented objects and per-view outputs from a trained MVFM run.

Examples::

    mvfm-export pointcloud --load-config outputs/scene/mvfm-splat/<timestamp>/config.yml --output-dir exports/pc
    # the Gaussians like pixel (column 40, row 30) of training view 2, as a standard 3DGS .ply
    mvfm-export segment --load-config .../config.yml --query-view 2 --query-pixel 40 30 --threshold 0.8
    mvfm-export views --load-config .../config.yml --camera-path path.json --query-feature query_feature.safetensors

The logic lives in :mod:`mvfm_nerfstudio.export`.
"""

from __future__ import annotations

from typing import List, Optional


def entrypoint(argv: Optional[List[str]] = None) -> None:
    import tyro
    from rich.console import Console

    from mvfm_nerfstudio.export import Commands

    command = tyro.cli(Commands, args=argv)
    summary = command.main()
    count = summary.get("points", summary.get("gaussians", len(summary.get("views", []))))
    Console().print(f"[green]mvfm-export[/green]: {count} {'views' if 'views' in summary else 'points'} "
                    f"written to {command.output_dir}")


if __name__ == "__main__":
    entrypoint()
