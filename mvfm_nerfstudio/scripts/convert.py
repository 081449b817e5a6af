"""``mvfm-convert``: a published MVFM checkpoint (the authors' ``best.pth``) -> one self-contained ``.safetensors``.

Examples::

    mvfm-convert --source Leoseg/dinov2_reg --output models/mv_dinov2.safetensors     # hub (cached or downloaded)
    mvfm-convert --source /data/dinov2_reg --output models/mv_dinov2.safetensors      # folder: args.yaml + checkpoints/
    mvfm-convert --source /data/dinov2_reg/checkpoints/best.pth --output mv_dinov2.safetensors

The output holds the fine-tuned backbone (LoRA merged), the adapters, the LoRA factors (for the base model) and
the architecture profile as metadata; pass it anywhere an adapter checkpoint goes (``--adapters``,
``--features.adapters``, ``--pipeline.datamanager.features.adapters``, ``create_mvfm(..., adapters=...)``).
Later runs read only safetensors: the pickle-based ``.pth`` is opened once, here, with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from mvfm_nerfstudio.utils.cli import cli_entrypoint


@dataclass
class ConvertArgs:
    """Convert a published MVFM checkpoint into one safetensors file (backbone + adapters + profile)."""

    source: str
    """Published model: a Hugging Face id (Leoseg/dinov2_reg, Leoseg/dinov2_reg_no_plucker, Leoseg/dinov3,
    Leoseg/clip, Leoseg/sam), a folder with args.yaml + checkpoints/best.pth, or the best.pth itself."""
    output: Path
    """The .safetensors file to write (atomically)."""
    variant: Optional[str] = None
    """Variant the checkpoint must be (dinov2_reg, dinov2_reg_no_plucker, dinov3, clip, sam); another is refused.
    None = the one the source's name promises, if any, else whatever the keys show."""


def main(args: ConvertArgs) -> Path:
    import time

    from rich.console import Console

    from mvfm_nerfstudio.models.published import convert_published

    console = Console()
    t0 = time.perf_counter()
    model, notes = convert_published(args.source, args.output, variant=args.variant)
    seconds = time.perf_counter() - t0
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    n_adapters = sum(p.numel() for p in model.trainable_parameters())
    console.print(
        f"[green]converted[/green] {args.source} ({model.published['published_variant']}, backbone "
        f"{model.backbone.spec.name}{' tiny' if model.backbone.tiny else ''}: {n_backbone / 1e6:.1f}M parameters, "
        f"adapters {n_adapters / 1e6:.2f}M, {len(model.backbone_lora)} LoRA layers merged) in {seconds:.1f} s"
    )
    for note in notes:
        console.print(f"  note: {note}")
    console.print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB)")
    return args.output


@cli_entrypoint("mvfm-convert")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    import tyro

    main(tyro.cli(ConvertArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
