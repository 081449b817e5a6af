"""``mvfm-eval``: base vs MVFM multi-view consistency (Loc. Err., PCK, Base Sim., viewpoint curve).

Example::

    mvfm-eval --scenes data/scene --adapters outputs/adapt/adapters.safetensors --output-dir outputs/eval
    # the paper's comparison with the released MV-DINOv2: base DINOv2, FiT3D and MV-DINOv2 on the same sets
    mvfm-eval --scenes data/scene --adapters Leoseg/dinov2_reg --compare --output-dir outputs/compare

Writes ``metrics.json``, ``viewpoint_curve.png`` and ``matches_<scene>.png`` to ``--output-dir``
(with ``--compare`` also ``compare.json``, ``compare.md``, ``compare.png``).
Backbone, weights, resolution and train/held-out split default to what the checkpoint was trained with.
"""

from __future__ import annotations

from typing import List, Optional

from mvfm_nerfstudio.utils.cli import cli_entrypoint


def print_table(payload) -> None:
    """Rich table of per-scene base vs MVFM metrics."""
    from rich.console import Console
    from rich.table import Table

    thresholds = payload["pck_thresholds_px"]
    table = Table(title=f"base vs MVFM ({payload['split']} sets, {payload['num_views']} views)")
    cols = ["scene", "Loc. Err. base", "Loc. Err. MVFM"]
    cols += [f"PCK@{t:g}px base/MVFM" for t in thresholds] + ["Base Sim.", "matches"]
    for c in cols:
        table.add_column(c)
    for name, r in payload["scenes"].items():
        pck = [f"{r['base'][f'pck@{t:g}px']:.3f} / {r['mvfm'][f'pck@{t:g}px']:.3f}" for t in thresholds]
        table.add_row(name, f"{r['base']['loc_err']:.4f}", f"{r['mvfm']['loc_err']:.4f}", *pck,
                      f"{r['base_sim']:.3f}", str(r["mvfm"]["num_matches"]))
    Console().print(table)


@cli_entrypoint("mvfm-eval")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    import tyro

    from mvfm_nerfstudio.evaluation.runner import EvalConfig, run_evaluation

    config = tyro.cli(EvalConfig, args=argv)
    payload = run_evaluation(config)
    print_table(payload)
    print(f"wrote {config.output_dir}/metrics.json")
    if config.compare:
        print((config.output_dir / "compare.md").read_text())
        print(f"wrote {config.output_dir}/compare.json, compare.md" + (", compare.png" if config.plots else ""))


if __name__ == "__main__":
    entrypoint()
