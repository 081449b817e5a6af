"""Training and evaluating a surface-normal probe on one scene (``mvfm-normals train`` / ``eval``).

Training: the views are split into train / held-out (:func:`~mvfm_nerfstudio.data.split_views`); the training
views are grouped into sets of nearby views (:func:`~mvfm_nerfstudio.data.group_views`); the frozen model's
intermediate features of every set are computed once and kept in memory (float16); the head is trained with
AdamW (cosine decay) on the angular (or uncertainty-aware) loss against ground truth at the head's output
grid (4x the feature grid, nearest-resized). Each step draws ``batch_sets`` sets from a generator seeded by
``(seed, step)``, so a resumed run draws what an uninterrupted one would.

Evaluation: each held-out view forms a set with its ``S - 1`` nearest training views, as the reference (first)
view; predictions are upsampled to the input image size and compared with the ground truth there:

* Probe3D's metrics (mean, median, RMSE of the angular error; % under 11.25, 22.5, 30 degrees) over the
  held-out views' pixels with ground truth, for the probe and for the best constant predictor (the mean
  training normal in the probe's frame);
* multi-view disagreement: for correspondences between the held-out view and the other views of its set
  (from depth, else SfM tracks), the angle between the world-frame normals predicted at the two pixels,
  beside the same for the ground truth (its floor: pixel rounding, depth noise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data.correspondences import correspondences_from_depth, correspondences_from_tracks
from ..data.readers import load_scene
from ..data.sampling import group_views, split_views
from ..data.scene import PosedScene
from ..errors import SceneError
from ..geometry.cameras import view_distances
from ..geometry.feature_grid import input_size_for
from ..geometry.normals import angular_error, angular_metrics, error_to_rgb, normals_to_rgb, rotate_normals
from ..models.build import build_model
from ..models.mvfm import MultiViewFoundationModel
from ..training.trainer import latest_checkpoint
from ..utils.io import atomic_path, atomic_write
from ..utils.progress import make_progress
from ..utils.runtime import torch_threads
from .config import NormalsEvalConfig, NormalsTrainConfig, normals_config_to_dict
from .head import MultiViewNormalHead, NormalHeadConfig, normal_loss, upsample_normals
from .normals import (
    NormalProbe,
    default_layers,
    extract_layers,
    load_probe,
    save_probe,
    target_from_camera,
    world_from_target,
)

__all__ = ["SetFeatures", "prepare_sets", "train_normal_probe", "evaluate_normal_probe", "run_normals_eval",
           "training_sets", "heldout_sets"]

Size = Tuple[int, int]


@dataclass
class SetFeatures:
    """Cached frozen features and ground truth of view sets."""

    sets: List[Tuple[int, ...]]
    """Scene view indices of each set (view 0 = reference)."""
    layers: List[torch.Tensor]
    """Per layer ``[num_sets, S, C, h, w]`` float16."""
    cam_to_world: torch.Tensor
    """``[num_sets, S, 4, 4]`` float64 OpenCV poses."""
    intrinsics: torch.Tensor
    """``[num_sets, S, 3, 3]`` K of the input images."""
    input_size: Size
    """``(H, W)`` of the images the features were computed from."""


def training_sets(scene: PosedScene, train: Sequence[int], num_views: int) -> List[Tuple[int, ...]]:
    """Sets of nearby training views (each view with its nearest ``num_views - 1`` training views, distinct sets)."""
    train = list(train)
    local = group_views(scene.cam_to_world[train], min(num_views, len(train)), "neighbors")
    return [tuple(train[i] for i in s) for s in local]


def heldout_sets(scene: PosedScene, train: Sequence[int], held: Sequence[int], num_views: int) -> List[Tuple[int, ...]]:
    """For each held-out view: (that view, its ``num_views - 1`` nearest training views)."""
    dist = view_distances(scene.cam_to_world)
    train_t = torch.tensor(list(train))  # device: view indices into CPU pose tensors
    k = min(num_views - 1, len(train_t))
    out = []
    for h in held:
        order = train_t[dist[h, train_t].argsort()[:k]]
        out.append((int(h), *order.tolist()))
    return out


def prepare_sets(
    model: MultiViewFoundationModel, scene: PosedScene, sets: Sequence[Tuple[int, ...]], size: Size,
    layers: Sequence[int], features: str, progress=None, device: Optional[torch.device] = None,
) -> SetFeatures:
    """Run the frozen model once over ``sets`` (images resized to ``size``) and keep the layers' features."""
    device = device or next(model.parameters()).device
    per_layer: List[List[torch.Tensor]] = [[] for _ in layers]
    c2w, intr = [], []
    task = progress.add_task(f"features ({features})", total=len(sets), info="") if progress else None
    for s in sets:
        batch = scene.load_views(list(s), size=size)
        feats = extract_layers(model, batch.images[None].to(device), batch.intrinsics[None].to(device),
                               batch.cam_to_world[None].to(device), layers, features)
        for store, f in zip(per_layer, feats):
            store.append(f[0].to("cpu", torch.float16))
        c2w.append(scene.cam_to_world[list(s)])
        intr.append(batch.intrinsics)
        if progress:
            progress.advance(task)
    return SetFeatures(list(sets), [torch.stack(x) for x in per_layer], torch.stack(c2w), torch.stack(intr), size)


def _targets(scene: PosedScene, data: SetFeatures, frame: str, size: Size, cfg) -> torch.Tensor:
    """Ground truth ``[num_sets, S, 3, H, W]`` in the probe's frame at ``size`` (NaN = none)."""
    views = sorted({i for s in data.sets for i in s})
    gt = scene.load_normals(views, size=size, frame="camera", source=cfg.normals_source,
                            max_rel_jump=cfg.max_rel_jump, smooth_radius=cfg.smooth_radius)
    pos = {v: k for k, v in enumerate(views)}
    cam = torch.stack([gt[[pos[i] for i in s]] for s in data.sets])
    return rotate_normals(cam, target_from_camera(data.cam_to_world, frame)).float()


def _lr_at(cfg: NormalsTrainConfig, step: int) -> float:
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / max(1, cfg.steps))))


def _metadata(cfg: NormalsTrainConfig, step: int, scene: PosedScene) -> Dict[str, str]:
    return {
        "tiny": "1" if cfg.tiny else "0",
        "weights": cfg.weights,
        "model_seed": str(cfg.model_seed),
        "adapters": "" if cfg.adapters is None else str(cfg.adapters),
        "image_size": str(cfg.image_size),
        "num_views": str(cfg.num_views),
        "holdout_every": str(cfg.holdout_every),
        "scene": str(scene.root),
        "step": str(step),
        "train_config": json.dumps(normals_config_to_dict(cfg)),
    }


def train_normal_probe(cfg: NormalsTrainConfig, model: Optional[MultiViewFoundationModel] = None,
                       scene: Optional[PosedScene] = None) -> Tuple[Path, Optional[Dict]]:
    """Train a normal probe as ``cfg`` says (see the module docstring).

    Args:
        cfg: the run's configuration.
        model: the frozen model (default: built from ``cfg``, a :class:`~mvfm_nerfstudio.models.build.ModelSpec`).
        scene: the scene (default: read from ``cfg.scene``).

    Returns:
        ``(output_dir/head.safetensors, held-out metrics or None when cfg.evaluate is False)``.
    """
    with torch_threads(cfg.num_threads):
        return _train(cfg, model, scene)


def _train(cfg: NormalsTrainConfig, model, scene) -> Tuple[Path, Optional[Dict]]:
    t0 = time.perf_counter()
    out = Path(cfg.output_dir)
    scene = scene if scene is not None else load_scene(cfg.scene)
    if not scene.has_normals:
        raise SceneError(f"scene {scene.name!r} ({scene.root}) has no ground-truth normals: it needs normal files "
                         "(mvfm-make-scene writes them) or depth maps (depth_file_path in transforms.json)")
    model = model if model is not None else build_model(cfg)
    device = next(model.parameters()).device
    if cfg.features == "mvfm" and cfg.adapters is None:
        print("note: features=mvfm without --adapters: untrained adapters reproduce the base model exactly")
    layers = tuple(model.backbone.layer_indices(cfg.layers or default_layers(model.backbone.depth)))
    train, held = split_views(scene, cfg.holdout_every)
    size = input_size_for(scene.image_size(train[0]), cfg.image_size, model.patch_size)
    grid = (size[0] // model.patch_size, size[1] // model.patch_size)
    out_size = (4 * grid[0], 4 * grid[1])
    sets = training_sets(scene, train, cfg.num_views)
    head_cfg = NormalHeadConfig(in_dims=tuple([model.backbone.embed_dim] * len(layers)), hidden_dim=cfg.hidden_dim,
                                num_heads=cfg.num_heads, view_interaction=cfg.view_interaction,
                                uncertainty=cfg.uncertainty)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = MultiViewNormalHead(head_cfg)
    probe = NormalProbe(head, layers, cfg.features, cfg.frame, model.backbone.spec.name).to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if cfg.resume:
        latest = latest_checkpoint(out)
        if latest is None:
            print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
        else:
            step, head_path, state_path = latest
            loaded, _ = load_probe(head_path, device)
            probe.head.load_state_dict(loaded.head.state_dict())
            opt.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True)["optimizer"])
            print(f"resumed from {head_path} (step {step})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", json.dumps(normals_config_to_dict(cfg), indent=2).encode())
    writer = None
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)
    with make_progress(cfg.progress) as progress:
        data = prepare_sets(model, scene, sets, size, layers, cfg.features, progress, device)
        targets = _targets(scene, data, cfg.frame, out_size, cfg)
        task = progress.add_task("normal head", total=cfg.steps, info="", completed=step)
        probe.train()
        while step < cfg.steps:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            pick = torch.randint(len(data.sets), (cfg.batch_sets,), generator=g)  # device: indexes the CPU cache
            feats = [x[pick].to(device).float() for x in data.layers]
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, step)
            normals, kappa = probe.head(feats)
            target = targets[pick].to(device)
            loss = normal_loss(normals, target, kappa)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if writer is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                with torch.no_grad():
                    err = angular_error(normals.detach(), target)
                writer.add_scalar("train/loss", float(loss), step)
                writer.add_scalar("train/mean_angle_deg", float(err[torch.isfinite(err)].mean()), step)
                writer.add_scalar("train/lr", _lr_at(cfg, step - 1), step)
            progress.update(task, advance=1, info=f"loss {float(loss):.3f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_checkpoint(probe, opt, out, step, cfg, scene)
    probe.eval()
    constant = _constant_normal(targets)
    final = save_probe(probe, out / "head.safetensors",
                       {**_metadata(cfg, step, scene), "constant_normal": json.dumps(constant.tolist())})
    train_seconds = time.perf_counter() - t0
    metrics = None
    if cfg.evaluate:
        metrics = evaluate_normal_probe(model, probe, scene, cfg.image_size, cfg.num_views, cfg.holdout_every,
                                        out / "eval", cfg, progress=cfg.progress, constant=constant)
        metrics["train_seconds"] = train_seconds
        atomic_write(out / "eval" / "metrics.json", json.dumps(metrics, indent=2).encode())
        if writer is not None:
            for k in ("mean", "median", "rmse", "pct_11.25", "pct_22.5", "pct_30"):
                writer.add_scalar(f"heldout/{k}", metrics["probe"][k], step)
    if writer is not None:
        writer.close()
    return final, metrics


def _save_checkpoint(probe, opt, out: Path, step: int, cfg, scene) -> None:
    stem = out / "checkpoints" / f"step-{step:07d}"
    save_probe(probe, stem.with_suffix(".safetensors"), _metadata(cfg, step, scene))
    with atomic_path(stem.with_suffix(".state.pt")) as tmp:
        torch.save({"optimizer": opt.state_dict(), "step": step}, tmp)
    old = sorted((out / "checkpoints").glob("step-*.state.pt"))[:-2]  # keep the newest two
    for p in old:
        p.unlink(missing_ok=True)
        p.with_name(p.name.replace(".state.pt", ".safetensors")).unlink(missing_ok=True)


def _constant_normal(targets: torch.Tensor) -> torch.Tensor:
    """The mean ground-truth direction ``[3]`` (unit) over the training targets: the best single normal."""
    t = targets.movedim(-3, -1).reshape(-1, 3)
    t = t[torch.isfinite(t).all(-1)]
    return torch.nn.functional.normalize(t.double().mean(0), dim=0).float()


def _sample(maps: torch.Tensor, view: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Values ``[P, 3]`` of ``maps [S, 3, H, W]`` at the pixels containing ``xy [P, 2]`` of views ``view [P]``."""
    h, w = maps.shape[-2:]
    col = xy[:, 0].floor().long().clamp(0, w - 1)
    row = xy[:, 1].floor().long().clamp(0, h - 1)
    return maps[view, :, row, col]


@torch.no_grad()
def evaluate_normal_probe(
    model: MultiViewFoundationModel, probe: NormalProbe, scene: PosedScene, image_size: int, num_views: int,
    holdout_every: int, output_dir: Optional[Path], cfg, progress: bool = True, max_images: int = 8,
    constant: Optional[torch.Tensor] = None,
) -> Dict:
    """Held-out metrics of ``probe`` on ``scene`` (see the module docstring); PNGs to ``output_dir``.

    ``cfg`` supplies the ground-truth options (``normals_source``, ``max_rel_jump``, ``smooth_radius``);
    ``constant`` is the constant predictor's normal in the probe's frame (default: none reported).
    """
    probe.check_model(model)
    device = next(probe.parameters()).device
    train, held = split_views(scene, holdout_every)
    size = input_size_for(scene.image_size(held[0]), image_size, model.patch_size)
    sets = heldout_sets(scene, train, held, num_views)
    t0 = time.perf_counter()
    with make_progress(progress) as bar:
        data = prepare_sets(model, scene, sets, size, probe.layers, probe.features, bar, device)
    gt = _targets(scene, data, probe.frame, size, cfg)  # [E, S, 3, H, W] in the probe's frame
    errors, const_errors, disagreement, gt_disagreement = [], [], [], []
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    for e, s in enumerate(data.sets):
        normals, _ = probe.head([x[e:e + 1].to(device).float() for x in data.layers])
        pred = upsample_normals(normals, size)[0].cpu()  # [S, 3, H, W]
        err = angular_error(pred[0], gt[e, 0])
        errors.append(err.flatten())
        if constant is not None:
            const_errors.append(angular_error(constant[:, None, None].expand_as(gt[e, 0]), gt[e, 0]).flatten())
        rot = world_from_target(data.cam_to_world[e], probe.frame)
        world = rotate_normals(pred, rot)
        world_gt = rotate_normals(gt[e], rot)
        corr = _correspondences(scene, s)
        if corr is not None:
            corr = corr.scaled(scene, list(s), size)
            keep = corr.src_view == 0  # from the held-out view to the others
            a = _sample(world, corr.src_view[keep], corr.src_xy[keep])
            b = _sample(world, corr.dst_view[keep], corr.dst_xy[keep])
            ga = _sample(world_gt, corr.src_view[keep], corr.src_xy[keep])
            gb = _sample(world_gt, corr.dst_view[keep], corr.dst_xy[keep])
            both = torch.isfinite(ga).all(-1) & torch.isfinite(gb).all(-1)
            disagreement.append(angular_error(a[both], b[both], dim=-1))
            gt_disagreement.append(angular_error(ga[both], gb[both], dim=-1))
        if output_dir is not None and e < max_images:
            _write_pngs(Path(output_dir), scene.frame_names[s[0]], pred[0], gt[e, 0], err, probe.frame == "camera")
    result = {
        "scene": scene.name,
        "features": probe.features,
        "frame": probe.frame,
        "layers": list(probe.layers),
        "image_size": list(size),
        "heldout_views": [int(h) for h in held],
        "probe": angular_metrics(torch.cat(errors)),
        "eval_seconds": time.perf_counter() - t0,
    }
    if const_errors:
        result["constant"] = angular_metrics(torch.cat(const_errors))
    if disagreement:
        d, g = torch.cat(disagreement), torch.cat(gt_disagreement)
        result["multiview"] = {
            "mean_disagreement_deg": float(d.mean()) if d.numel() else float("nan"),
            "median_disagreement_deg": float(d.median()) if d.numel() else float("nan"),
            "gt_mean_disagreement_deg": float(g.mean()) if g.numel() else float("nan"),
            "num_correspondences": int(d.numel()),
        }
    if output_dir is not None:
        atomic_write(Path(output_dir) / "metrics.json", json.dumps(result, indent=2).encode())
    return result


def _correspondences(scene: PosedScene, views: Tuple[int, ...]):
    """Correspondences within a set: from depth when the scene has it (dense), else SfM tracks, else None."""
    if scene.has_depth:
        return correspondences_from_depth(scene, list(views), stride=4)
    if scene.tracks is not None and len(scene.tracks):
        return correspondences_from_tracks(scene, list(views))
    return None


def _write_pngs(folder: Path, frame_name: str, pred: torch.Tensor, gt: torch.Tensor, err: torch.Tensor,
                camera_frame: bool) -> None:
    from PIL import Image

    stem = Path(frame_name).stem
    Image.fromarray(normals_to_rgb(pred, camera_frame)).save(folder / f"{stem}_pred.png")
    Image.fromarray(normals_to_rgb(gt, camera_frame)).save(folder / f"{stem}_gt.png")
    Image.fromarray(error_to_rgb(err)).save(folder / f"{stem}_error.png")


def run_normals_eval(cfg: NormalsEvalConfig) -> Dict:
    """``mvfm-normals eval``: rebuild the model from the head's metadata, evaluate, write metrics and PNGs."""
    from .config import normals_config_from_dict

    with torch_threads(cfg.num_threads):
        probe, meta = load_probe(cfg.head)
        train_cfg = normals_config_from_dict(json.loads(meta["train_config"]))
        # the model training used (every ModelSpec field: bf16 too), on the device asked for now
        model = build_model(dataclasses.replace(train_cfg, device=cfg.device or train_cfg.device))
        probe = probe.to(next(model.parameters()).device)
        scene = load_scene(cfg.scene if cfg.scene is not None else meta["scene"])
        constant = None
        if "constant_normal" in meta:
            constant = torch.tensor(json.loads(meta["constant_normal"]))  # device: compared with CPU ground truth
        out = cfg.output_dir if cfg.output_dir is not None else Path(cfg.head).parent / "eval"
        return evaluate_normal_probe(model, probe, scene, int(meta["image_size"]), int(meta["num_views"]),
                                     int(meta["holdout_every"]), Path(out), train_cfg, progress=cfg.progress,
                                     max_images=cfg.max_images, constant=constant)
