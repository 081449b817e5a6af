"""``mvfm-demo``: the Nerfstudio main job end to end on the generated demo scene.

1. checks the backbone weights first (fails within seconds, naming the options, when
   pretrained weights are neither cached nor downloadable);
2. generates the procedural demo scene if it is missing (``mvfm-make-scene`` generator);
3. trains ``mvfm-features`` with the real Nerfstudio trainer, in this process, with a
   CPU-sized configuration (MVFM features are extracted and cached first);
4. prints the ``ns-viewer`` command that opens the result.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import tyro

from ..backbones.vit import create_backbone
from ..errors import CheckpointMismatchError, WeightsUnavailableError
from ..models.build import ModelSpec
from ..utils.cli import cli_entrypoint
from ..utils.runtime import resolve_device


@dataclass
class DemoArgs(ModelSpec):
    """Train an MVFM feature field (mvfm-features) on the generated demo scene and show how to view it.

    The model options (--weights, --backbone, --adapters, --tiny, --model-seed, --device) are the feature store's.
    """

    output_dir: Path = Path("outputs/mvfm-demo")
    """Where the scene (if generated), the feature cache and the Nerfstudio run go."""
    scene: Optional[Path] = None
    """Scene folder (Nerfstudio transforms.json); None = <output_dir>/scene, generated if missing."""
    iterations: int = 1200
    """Nerfstudio training iterations."""
    rays_per_batch: int = 512
    """Training rays per iteration."""
    feature_resolution: int = 24
    """Feature-grid cells along each image's longer side (MVFM input = this x patch size)."""
    feature_dim: int = 32
    """Channels kept by the cache's PCA."""
    scene_views: int = 24
    """Views of the generated demo scene."""
    num_threads: int = 1
    """Torch CPU threads. One is the default: nerfacto on the CPU is many small operations, which a second thread
    barely speeds up on an idle 2-core machine and slows down ~4x when other processes compete for the cores."""


def _check_weights(args: DemoArgs) -> None:
    """Fail fast with the core's weights message (all options) plus the demo's own flag."""
    if args.weights == "random":
        return
    try:
        create_backbone(args.backbone, args.weights, tiny=args.tiny)
    except (WeightsUnavailableError, CheckpointMismatchError, ValueError) as err:
        print(f"mvfm-demo: cannot load the backbone weights.\n{err}\n\n"
              "To run the demo anyway with random weights (the pipeline runs end to end, but features carry no "
              "meaning):\n  mvfm-demo --weights random", file=sys.stderr)
        raise SystemExit(2) from err


def _demo_scene(args: DemoArgs) -> Path:
    from mvfm_nerfstudio.data.generator import SceneGeneratorConfig, make_scene

    scene = args.scene or args.output_dir / "scene"
    if (scene / "transforms.json").is_file():
        print(f"mvfm-demo: using the existing scene {scene}")
        return scene
    if args.scene is not None:
        raise SystemExit(f"mvfm-demo: {scene} has no transforms.json (omit --scene to generate the demo scene)")
    print(f"mvfm-demo: generating the demo scene in {scene}")
    make_scene(SceneGeneratorConfig(num_views=args.scene_views, height=144, width=192, supersample=1), scene)
    return scene


def build_config(args: DemoArgs, scene: Path):
    """The ``mvfm-features`` trainer config of the demo (nerfacto scaled down for a CPU)."""
    from .features_method import mvfm_features_config

    device = resolve_device(args.device).type
    config = mvfm_features_config()
    config.experiment_name = "demo"
    config.output_dir = args.output_dir / "runs"
    config.max_num_iterations = args.iterations
    config.steps_per_save = max(1, args.iterations // 3)
    config.steps_per_eval_batch = config.steps_per_eval_image = max(1, args.iterations // 3)
    config.steps_per_eval_all_images = 10**9
    config.machine.device_type = device
    config.vis = "tensorboard"
    config.viewer.quit_on_train_completion = True
    dm = config.pipeline.datamanager
    dm.data = scene
    dm.dataparser.data = scene
    dm.train_num_rays_per_batch = args.rays_per_batch
    dm.eval_num_rays_per_batch = args.rays_per_batch
    f = dm.features
    for spec_field in dataclasses.fields(ModelSpec):  # the model fields; device 'auto' = the trainer's
        if spec_field.name != "device":
            setattr(f, spec_field.name, getattr(args, spec_field.name))
    f.feature_resolution, f.feature_dim = args.feature_resolution, args.feature_dim
    f.cache_dir = args.output_dir / "feature_cache"
    m = config.pipeline.model
    if device == "cpu":
        # ~0.3 CPU-s per iteration with one thread (nerfacto's defaults: several s per iteration): one proposal
        # network, fewer samples, smaller hash grids
        m.num_proposal_iterations = 1
        m.num_proposal_samples_per_ray = (48,)
        m.proposal_net_args_list = m.proposal_net_args_list[:1]
        m.num_nerf_samples_per_ray = 16
        m.num_levels, m.log2_hashmap_size, m.max_res = 8, 14, 256
        m.feature_num_levels, m.feature_log2_hashmap_size = 6, 13
        m.eval_num_rays_per_chunk = 1 << 12
        config.viewer.num_rays_per_chunk = 1 << 12
    return config


def viewer_command(config_path: Path) -> str:
    """The ``ns-viewer`` command that opens a run on this machine only, shell-quoted (paths may hold spaces)."""
    import shlex

    return shlex.join(["ns-viewer", "--load-config", str(config_path), "--viewer.websocket-host", "127.0.0.1"])


def main(args: DemoArgs) -> Path:
    """Run the demo; returns the Nerfstudio ``config.yml`` of the trained run."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.num_threads)
    _check_weights(args)
    scene = _demo_scene(args)
    config = build_config(args, scene)
    config.set_timestamp()
    config.save_config()
    from nerfstudio.scripts.train import train_loop

    train_loop(local_rank=0, world_size=1, config=config)  # ns-train's own loop: seeds random / numpy / torch
    config_path = config.get_base_dir() / "config.yml"
    minutes = (time.perf_counter() - start) / 60
    print(
        f"\nmvfm-demo: done in {minutes:.1f} min. Open the result in the Nerfstudio viewer:\n"
        f"  {viewer_command(config_path)}\n"
        "then browse to http://127.0.0.1:7007 (from another machine: ssh -L 7007:127.0.0.1:7007 <host>).\n"
        "Output types: 'feature_pca' (fixed-colour features), 'rgb', 'depth'; 'similarity' and 'segmentation' "
        "appear once a query feature is set."
    )
    return config_path


@cli_entrypoint("mvfm-demo")
def entrypoint(argv: Optional[List[str]] = None) -> None:
    main(tyro.cli(DemoArgs, args=argv))


if __name__ == "__main__":
    entrypoint()
