"""``mvfm-info``: registered backbones, the published MVFM models and FiT3D backbones, and whether each is in the
Hugging Face cache (so usable offline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import tyro

from mvfm_nerfstudio.utils.cli import cli_entrypoint


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
    for col in ("name", "timm weights", "patch", "default size", "width", "features", "prefix", "text tower", "cached"):
        table.add_column(col)
    for name in list_backbones():
        s = get_backbone_spec(name)
        cached = "-"
        if args.check_cache:
            cached = "yes" if cached_pretrained_file(s) else "no"
        table.add_row(
            name, s.timm_pretrained_name, str(s.patch_size), "x".join(map(str, s.default_image_size)),
            str(s.embed_dim), str(s.feature_dim), str(s.num_prefix_tokens), s.text_tower or "-", cached,
        )
    console = Console()
    console.print(table)

    from mvfm_nerfstudio.backbones.vit import FIT3D_FILES, FIT3D_REPO, cached_fit3d_file
    from mvfm_nerfstudio.models.authors_layout import backbone_for
    from mvfm_nerfstudio.models.published import PUBLISHED_MODELS, cached_published

    published = Table(title="published MVFM models (use as adapters=<hub id>; mvfm-convert makes a safetensors)")
    for col in ("hub id", "backbone", "what", "cached"):
        published.add_column(col)
    for variant, m in PUBLISHED_MODELS.items():
        cached = "-" if not args.check_cache else "yes" if cached_published(variant) else "no"
        published.add_row(m.repo_id, backbone_for(variant), m.description, cached)
    console.print(published)
    fit3d = Table(title=f"FiT3D fine-tuned backbones ({FIT3D_REPO}; use as weights='fit3d')")
    for col in ("backbone", "file", "cached"):
        fit3d.add_column(col)
    for name, filename in FIT3D_FILES.items():
        cached = "-" if not args.check_cache else "yes" if cached_fit3d_file(get_backbone_spec(name)) else "no"
        fit3d.add_row(name, filename, cached)
    console.print(fit3d)
    console.print("Not cached and offline: download on a connected machine and copy its Hugging Face cache "
                  "(~/.cache/huggingface/hub) here, or pass local files (see README, 'Use the published models').")


@cli_entrypoint("mvfm-info")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    main(tyro.cli(InfoArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
