"""``mvfm-segment``: consistent masks of one queried thing in every view of a posed scene.

Examples::

    # query = a pixel (column 412, row 230) of view 3
    mvfm-segment --scene data/scene --query-view 3 --query-pixel 412 230 --output-dir outputs/seg
    # reuse that query on another scene (same backbone)
    mvfm-segment --scene data/other --query-feature outputs/seg/query_feature.safetensors --threshold 0.6
    # a text query (CLIP backbone; features in CLIP's text space, LERF relevancy >= 0.5)
    mvfm-segment --scene data/scene --text "red mug" --features.backbone clip_vitb16 --output-dir outputs/seg_mug

Writes ``masks/<image>.png``, ``similarity/<image>.png``, ``overview.png``,
``query_feature.safetensors`` (not for ``--text``; ``similarity/`` then shows the relevancy) and
``segment.json`` to ``--output-dir``. The logic lives in
:mod:`mvfm_nerfstudio.segmentation`.
"""

from __future__ import annotations

from typing import List, Optional

from mvfm_nerfstudio.utils.cli import cli_entrypoint


@cli_entrypoint("mvfm-segment")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    import tyro
    from rich.console import Console

    from mvfm_nerfstudio.segmentation import SegmentConfig, segment_scene

    config = tyro.cli(SegmentConfig, args=argv)
    summary = segment_scene(config)
    fractions = [v["mask_fraction"] for v in summary["views"]]
    Console().print(
        f"[green]Segmented {summary['num_views']} views[/green] (query: {summary['query']}; "
        f"threshold {summary['threshold']:.3f}, {summary['threshold_mode']}); mask covers "
        f"{100 * min(fractions):.1f}-{100 * max(fractions):.1f}% of each view.\n"
        f"Wrote masks/, similarity/{' (relevancy)' if config.text else ''}, overview.png, "
        f"{'' if config.text else 'query_feature.safetensors, '}segment.json to {config.output_dir}"
    )


if __name__ == "__main__":
    entrypoint()
