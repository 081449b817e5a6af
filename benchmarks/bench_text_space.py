"""Do MV-Adapters keep CLIP's text-space (MaskCLIP) dense features text-aligned?

    python benchmarks/bench_text_space.py                                  # llff_fern, 60 steps, reg 0.15 and 0
    python benchmarks/bench_text_space.py --scene path/to/scene --steps 100 --reg-weights 0.15

The adapters are trained as usual (``adapt_to_scene``, ``scene-adapt-cpu`` preset: adapters after the last 6
blocks, dense location loss + ``reg_weight`` x keep-the-base regulariser) on the normal features of
``clip_vitb16``, then loaded unchanged into the text-space model (the same backbone weights; the last block runs
its value path and CLIP's image projection maps every patch token). On held-out view sets the script reports, in
the normal space and in the text space: Base Sim. (mean per-cell cosine between MVFM and base features: how close
the MVFM stays to the base; in the text space, how close it stays to what the text tower was aligned with) and
Loc. Err. (multi-view consistency), for each ``--reg-weights`` value (0 = no keep-the-base regulariser).

Pretrained CLIP weights are unreachable offline: the backbone (and its projection head) is RANDOMLY INITIALISED
(seeded). The numbers say how far the adapters move the text-space features; they do not say how well pretrained
text queries work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_json  # noqa: E402

DEFAULT_SCENE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scenes" / "llff_fern"


def text_space_twin(model):
    """The text-space model with ``model``'s backbone weights and adapters (random head: no pretrained one)."""
    from mvfm_nerfstudio.models.build import create_mvfm

    torch.manual_seed(1)
    twin = create_mvfm(model.backbone.spec.name, weights="random", tiny=model.backbone.tiny, text_space=True,
                       **model.config.to_dict())
    missing, unexpected = twin.backbone.model.load_state_dict(model.backbone.model.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"head.weight", "head.bias"}, (missing, unexpected)
    twin.load_state_dict(model.adapter_state_dict(), strict=False)
    return twin.eval()


def adapter_architecture(ckpt: Path) -> dict:
    """The MVFMConfig fields stored in an adapter checkpoint."""
    import json

    from mvfm_nerfstudio.models.published import source_metadata

    return json.loads(source_metadata(str(ckpt))["config"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", type=Path, default=DEFAULT_SCENE)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--reg-weights", type=float, nargs="+", default=[0.15, 0.0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--eval-sets", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mvfm_bench_text_space"))
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from mvfm_nerfstudio.data.scene_data import heldout_view_sets, prepare_scene
    from mvfm_nerfstudio.evaluation.evaluate import evaluate_sets
    from mvfm_nerfstudio.models.build import build_model, spec_from_checkpoint
    from mvfm_nerfstudio.training import adapt_to_scene, load_preset

    if not args.scene.is_dir():
        sys.exit(f"scene {args.scene} not found: pass --scene")
    torch.set_num_threads(2)
    rows, results = [], {}
    data = None
    for reg in args.reg_weights:
        t0 = time.perf_counter()
        work = args.work_dir / f"reg{reg:g}"
        ckpt = adapt_to_scene(args.scene, config=load_preset("scene-adapt-cpu"), steps=args.steps, output_dir=work,
                              backbone="clip_vitb16", weights="random", image_size=args.image_size,
                              reg_weight=reg, eval_sets=0, checkpoint_every=args.steps, tensorboard=False,
                              single_process=True)
        train_s = time.perf_counter() - t0
        # rebuilt from the checkpoint's metadata (backbone, random weights, model seed): the backbone it was trained on
        model = build_model(spec_from_checkpoint(ckpt, device="cpu"), **adapter_architecture(ckpt))
        text = text_space_twin(model)
        if data is None:
            data = prepare_scene(args.scene, args.image_size, model.patch_size, 8)
            sets = heldout_view_sets(data, 4, args.eval_sets, 32, seed=0)
        entry = {"adaptation_s": round(train_s, 1)}
        for space, m in (("normal", model), ("text", text)):
            s = evaluate_sets(m, data, sets).summary()
            entry[space] = {"base_sim": s["base_sim"], "loc_err_base": s["base"]["loc_err"],
                            "loc_err_mvfm": s["mvfm"]["loc_err"]}
            rows.append({"reg_weight": reg, "space": space, "base_sim": f"{s['base_sim']:.3f}",
                         "loc_err_base": f"{s['base']['loc_err']:.3f}", "loc_err_mvfm": f"{s['mvfm']['loc_err']:.3f}"})
        results[f"reg_weight={reg:g}"] = entry
    print_table(rows, ["reg_weight", "space", "base_sim", "loc_err_base", "loc_err_mvfm"])
    payload = {"scene": str(args.scene), "steps": args.steps, "image_size": args.image_size,
               "eval_sets": args.eval_sets, "weights": "random (clip_vitb16, seed 0)", "results": results}
    write_json("text_space", payload, args.output)


if __name__ == "__main__":
    main()
