"""``mvfm-extract``: compute a scene's MVFM feature cache entry before training, on one or several processes.

Examples::

    # the entry ns-train mvfm-features --data data/scene will load (same feature options)
    mvfm-extract --scene data/scene --features.weights random
    # the same entry, its view sets split across 4 processes (GPUs: one each; CPU: gloo)
    torchrun --nproc-per-node 4 -m mvfm_nerfstudio.scripts.extract --scene data/scene

The logic lives in :mod:`mvfm_nerfstudio.nerfstudio_plugin.extraction`.
"""

from __future__ import annotations

from typing import List, Optional

from mvfm_nerfstudio.utils.cli import cli_entrypoint


@cli_entrypoint("mvfm-extract")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    import tyro

    from mvfm_nerfstudio.nerfstudio_plugin.extraction import ExtractConfig, extract_features

    extract_features(tyro.cli(ExtractConfig, args=argv))


if __name__ == "__main__":
    entrypoint()
