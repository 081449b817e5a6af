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

from mvfm_nerfstudio.utils.cli import cli_entrypoint


@cli_entrypoint("mvfm-export")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    """Run one subcommand; bad input (run, query, threshold, files) exits with status 2 and the reason."""
    import tyro
    from rich.console import Console

    from mvfm_nerfstudio.export import Commands

    command = tyro.cli(Commands, args=argv)
    summary = command.main()  # RunError is a ValueError: one line and exit 2 (cli_entrypoint)
    if "views" in summary:
        what = f"{len(summary['views'])} views"
    elif "gaussians" in summary:
        what = f"{summary['gaussians']} of {summary['of_gaussians']} Gaussians"
    else:
        what = f"{summary['points']} points"
    extra = f" (threshold {summary['threshold']:.3f}, {summary['threshold_mode']})" if "threshold" in summary else ""
    Console().print(f"[green]mvfm-export[/green]: {what}{extra} written to {command.output_dir}")


if __name__ == "__main__":
    entrypoint()
