"""``mvfm-train``: train MV-Adapters on posed scenes (one or many; DDP with ``torchrun``).

Examples::

    mvfm-train --preset scene-adapt-cpu --scenes data/scene --weights random --output-dir outputs/adapt
    mvfm-train --preset tiny-test --scenes data/scene --steps 50
    torchrun --nproc-per-node 2 -m mvfm_nerfstudio.scripts.train --preset scene-adapt-cpu --scenes a b
    mvfm-train --preset scene-adapt-cpu --scenes data/scene --output-dir outputs/adapt --resume

``--preset NAME`` (a file in configs/train/, or a YAML path) sets the defaults; every other
flag overrides them.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

from mvfm_nerfstudio.utils.cli import cli_entrypoint


def _print_summary(results) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out view sets (>= 1 held-out view each)")
    for col in ("scene", "Loc. Err. base", "Loc. Err. MVFM", "Base Sim.", "matches"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(name, f"{r['base']['loc_err']:.4f}", f"{r['mvfm']['loc_err']:.4f}", f"{r['base_sim']:.3f}",
                      str(r["mvfm"]["num_matches"]))
    Console().print(table)


@cli_entrypoint("mvfm-train")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    import tyro

    from mvfm_nerfstudio.training.config import TrainConfig, list_presets, load_preset
    from mvfm_nerfstudio.training.trainer import Trainer

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, rest = pre.parse_known_args(argv)
    default = load_preset(known.preset) if known.preset else TrainConfig()
    description = (
        (TrainConfig.__doc__ or "").strip()
        + f"\n\nPresets (--preset NAME, first flag): {', '.join(list_presets()) or 'none found'}; "
        "any other flag overrides the preset."
    )
    config = tyro.cli(TrainConfig, default=default, args=rest, description=description)
    trainer = Trainer(config)
    path = trainer.train()
    if trainer.is_main:
        print(f"adapters: {path}")
        if getattr(trainer, "last_eval", None):
            _print_summary(trainer.last_eval)


if __name__ == "__main__":
    entrypoint()
