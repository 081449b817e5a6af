"""``mvfm-info``: registered backbones and whether their pretrained weights are available offline."""

from __future__ import annotations

from dataclasses import dataclass

import tyro


@dataclass
class InfoArgs:
    """List the backbones an MVFM can be built on, with their sizes and weight availability."""

    check_cache: bool = True
    """Look up each backbone's pretrained weights in the Hugging Face cache (no network)."""


def main(args: InfoArgs) -> None:
    from rich.console import Console
    from rich.table import Table

    from mvfm_nerfstudio._version import __version__
    from mvfm_nerfstudio.backbones.registry import get_backbone_spec, list_backbones
    from mvfm_nerfstudio.backbones.vit import cached_pretrained_file

    table = Table(title=f"mvfm-nerfstudio {__version__}: registered backbones")
    for col in ("name", "timm weights", "patch", "default size", "width", "features", "prefix", "cached"):
        table.add_column(col)
    for name in list_backbones():
        s = get_backbone_spec(name)
        cached = "-"
        if args.check_cache:
            cached = "yes" if cached_pretrained_file(s) else "no"
        table.add_row(
            name, s.timm_pretrained_name, str(s.patch_size), "x".join(map(str, s.default_image_size)),
            str(s.embed_dim), str(s.feature_dim), str(s.num_prefix_tokens), cached,
        )
    Console().print(table)


def entrypoint() -> None:
    main(tyro.cli(InfoArgs))


if __name__ == "__main__":
    entrypoint()
