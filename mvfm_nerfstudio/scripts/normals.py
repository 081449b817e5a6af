"""``mvfm-normals``: surface-normal probes on frozen base or MVFM features (docs/normals.md).

Examples::

    mvfm-normals train --preset tiny-test --scene outputs/procedural_scene --output-dir outputs/normals
    mvfm-normals train --preset normals-cpu --scene data/scene --features mvfm \\
        --adapters outputs/adapt/adapters.safetensors --frame world --output-dir outputs/normals-mvfm
    mvfm-normals train --preset normals-cpu --scene data/scene --output-dir outputs/normals-mvfm --resume
    mvfm-normals eval --head outputs/normals/head.safetensors            # held-out views of its scene

``train --preset NAME`` (a file in configs/normals/, or a YAML path; first flag after ``train``) sets the
defaults, every other flag overrides them. Outputs: ``head.safetensors``, ``checkpoints/``, ``tensorboard/``,
``eval/metrics.json`` and, per held-out view, ``<frame>_pred.png``, ``_gt.png``, ``_error.png``.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from mvfm_nerfstudio.utils.cli import cli_entrypoint

USAGE = "usage: mvfm-normals {train,eval} [--help] [options]"


def print_metrics(metrics) -> None:
    """Rich table of the held-out metrics (probe vs the constant predictor)."""
    from rich.console import Console
    from rich.table import Table

    title = f"{metrics['scene']}: held-out normals ({metrics['features']} features, {metrics['frame']} frame)"
    table = Table(title=title)
    keys = ["mean", "median", "rmse", "pct_11.25", "pct_22.5", "pct_30"]
    table.add_column("predictor")
    for k in keys:
        table.add_column(k + (" (deg)" if not k.startswith("pct") else " (%)"))
    for name in ("probe", "constant"):
        if name in metrics:
            table.add_row(name, *[f"{metrics[name][k]:.2f}" for k in keys])
    Console().print(table)
    if "multiview" in metrics:
        mv = metrics["multiview"]
        print(f"multi-view disagreement: {mv['mean_disagreement_deg']:.2f} deg mean over {mv['num_correspondences']} "
              f"correspondences (ground truth: {mv['gt_mean_disagreement_deg']:.2f} deg)")


def _train(argv: List[str]) -> None:
    import tyro

    from mvfm_nerfstudio.probes.config import NormalsTrainConfig, list_normals_presets, load_normals_preset
    from mvfm_nerfstudio.probes.train import train_normal_probe

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, rest = pre.parse_known_args(argv)
    default = load_normals_preset(known.preset) if known.preset else NormalsTrainConfig()
    description = ((NormalsTrainConfig.__doc__ or "").strip()
                   + f"\n\nPresets (--preset NAME, first flag): {', '.join(list_normals_presets())}; "
                   "any other flag overrides the preset.")
    config = tyro.cli(NormalsTrainConfig, default=default, args=rest, description=description,
                      prog="mvfm-normals train")
    path, metrics = train_normal_probe(config)
    print(f"head: {path}")
    if metrics:
        print_metrics(metrics)
        print(f"wrote {config.output_dir / 'eval'}/metrics.json and PNGs")


def _eval(argv: List[str]) -> None:
    import tyro

    from mvfm_nerfstudio.probes.config import NormalsEvalConfig
    from mvfm_nerfstudio.probes.train import run_normals_eval

    config = tyro.cli(NormalsEvalConfig, args=argv, prog="mvfm-normals eval")
    metrics = run_normals_eval(config)
    print_metrics(metrics)


@cli_entrypoint("mvfm-normals")
def entrypoint(argv: Optional[List[str]] = None) -> None:  # cli_entrypoint passes the arguments as a list
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        _train(rest)
    elif command == "eval":
        _eval(rest)
    else:
        print(f"mvfm-normals: error: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    entrypoint()
