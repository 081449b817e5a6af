"""The MV-Adapter trainer behind ``mvfm-train`` and :func:`adapt_to_scene`.

* One scene or many; every scene's views are split into train / held-out; the trainer draws
  view sets of TRAINING views from per-scene pools (correspondences precomputed, base
  features cached once, since the base model is frozen).
* Each step's draw depends only on ``(seed, step)``: with ``W`` processes the global batch of
  ``batch_sets x W`` sets is drawn identically everywhere and each rank takes its slice, so a
  2-process run equals a 1-process run with twice the batch (up to float summation order).
* Checkpoints: ``checkpoints/step-XXXXXXX.safetensors`` (adapters, loadable with
  ``create_mvfm(..., adapters=...)``) and ``step-XXXXXXX.state.pt`` (optimiser state, step, RNG
  states; ``torch.load(weights_only=True)``), both written atomically. ``resume=True`` restores
  them and continues bit-exactly on CPU, from the newest checkpoint that verifies (a damaged newer one is
  named, moved aside and skipped), after checking the stored configuration matches.
* Run folder: a non-empty ``output_dir`` is refused unless ``resume`` or ``overwrite`` (which deletes the
  earlier run's outputs first), so two runs never mix (outputs, checkpoint rotation).
* A non-finite loss or gradient stops training (:class:`~mvfm_nerfstudio.errors.TrainingDivergedError`) before
  the optimiser step: the last good checkpoint stays as it was.
* Multi-process: launch with ``torchrun --nproc-per-node N mvfm-train ...`` (gloo on CPU,
  nccl on GPU); gradients are averaged by ``DistributedDataParallel``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..data.scene_data import SceneData, SceneLike, ViewSet, build_view_sets, heldout_view_sets, prepare_scene
from ..errors import RunFolderError, TrainingDivergedError
from ..evaluation.evaluate import evaluate_sets
from ..models.build import build_model
from ..models.mvfm import MultiViewFoundationModel
from ..utils.io import atomic_path, atomic_write
from ..utils.progress import make_progress
from ..utils.runtime import compute_precision, join_torchrun, torch_threads
from .config import TrainConfig, config_differences, config_to_dict
from .losses import base_regularizer, info_nce_loss, location_loss

__all__ = ["Trainer", "latest_checkpoint", "list_checkpoints", "model_metadata", "RUN_OUTPUTS"]

STATE_VERSION = 1
_CKPT = re.compile(r"step-(\d{7})\.state\.pt$")


def model_metadata(config: TrainConfig, step: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Adapter-checkpoint metadata written by the trainer (read back by ``mvfm-eval``)."""
    meta = {
        "model_seed": str(config.model_seed),
        "step": str(step),
        "image_size": str(config.image_size),
        "holdout_every": str(config.holdout_every),
        "train_config": json.dumps(config_to_dict(config), sort_keys=True),
    }
    meta.update(extra or {})
    return meta


RUN_OUTPUTS = ("adapters.safetensors", "config.json", "heldout_metrics.json", "checkpoints", "tensorboard")
"""What a training run writes into its ``output_dir`` (``overwrite`` deletes exactly these)."""


def list_checkpoints(output_dir: Path) -> List[Tuple[int, Path, Path]]:
    """Complete checkpoints ``(step, adapters.safetensors, state.pt)`` in ``output_dir/checkpoints``, newest first."""
    folder = Path(output_dir) / "checkpoints"
    found = []
    for p in folder.glob("step-*.state.pt") if folder.is_dir() else []:
        m = _CKPT.search(p.name)
        adapters = p.with_name(p.name.replace(".state.pt", ".safetensors"))
        if m and adapters.is_file():
            found.append((int(m.group(1)), adapters, p))
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: Path) -> Optional[Tuple[int, Path, Path]]:
    """Newest complete checkpoint ``(step, adapters.safetensors, state.pt)`` in ``output_dir/checkpoints``."""
    found = list_checkpoints(output_dir)
    return found[0] if found else None


class Trainer:
    """Train MV-Adapters.

    Args:
        config: the training configuration.
        scenes: scenes to train on (:class:`~mvfm_nerfstudio.data.PosedScene` objects or folders);
            default ``config.scenes``.
        model: an existing MVFM to train in place (its backbone must match the config's for
            evaluation to rebuild it); default: built from the config.
        single_process: train in this process alone even inside a distributed job (per-scene adaptation
            run by one rank of a multi-GPU ``ns-train``); default: join ``torchrun``'s process group.
    """

    def __init__(
        self,
        config: TrainConfig,
        scenes: Optional[Sequence[SceneLike]] = None,
        model: Optional[MultiViewFoundationModel] = None,
        single_process: bool = False,
    ):
        self.config = config
        self.single_process = single_process
        self._scene_inputs = list(scenes) if scenes is not None else list(config.scenes)
        if not self._scene_inputs:
            raise ValueError("no scenes to train on: pass scene folders (--scenes PATH ...)")
        self._given_model = model
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self.history: List[Dict[str, float]] = []
        self._setup_done = False

    # ------------------------------------------------------------------ setup
    @property
    def distributed(self) -> bool:
        return not self.single_process and dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank() if self.distributed else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.distributed else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _init_distributed(self, device: torch.device) -> None:
        """Join torchrun's process group (NCCL on CUDA, gloo on CPU) when this process starts it."""
        if not self.single_process:
            join_torchrun(device)

    def setup(self) -> "Trainer":
        """Build the model, load scenes, precompute pools and base features, create the optimiser, resume."""
        if not self._setup_done:
            with torch_threads(self.config.num_threads):
                self._setup()
        return self

    def _setup(self) -> None:
        cfg = self.config
        _check_config(cfg)
        self._claim_output_dir()
        self.device = cfg.resolve_device()
        self._init_distributed(self.device)
        if self._given_model is not None:
            self.model = self._given_model.to(self.device)
        else:
            self.model = build_model(cfg, default_device=self.device, **cfg.mvfm.to_dict())
        self.model.train()
        patch = self.model.patch_size
        self.scenes: List[SceneData] = []
        self.pools: List[List[ViewSet]] = []
        for i, s in enumerate(self._scene_inputs):
            data = prepare_scene(s, cfg.image_size, patch, cfg.holdout_every)
            views = min(cfg.num_views, len(data.train_views))
            pool = build_view_sets(data, views, cfg.pool_sets, cfg.min_shared, cfg.seed + 7919 * i,
                                   candidates=data.train_views)
            data.compute_base(self.model)
            self.scenes.append(data)
            self.pools.append(pool)
        self.trainable = [p for p in self.model.trainable_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ddp = None
        if self.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = None if self.device.type == "cpu" else [self.device]
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        if cfg.resume:
            self._resume()
        self._setup_done = True

    def _claim_output_dir(self) -> None:
        """Refuse a non-empty run folder unless resuming or overwriting; with ``overwrite`` delete the earlier run's
        outputs (only :data:`RUN_OUTPUTS`; anything else in the folder is left alone)."""
        cfg, out = self.config, self.output_dir
        if cfg.resume and cfg.overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: pass one")
        if cfg.resume or not out.is_dir() or not any(out.iterdir()):
            return
        if not cfg.overwrite:
            held = sorted(p.name for p in out.iterdir())
            raise RunFolderError(
                f"output folder {out} is not empty (holds {', '.join(held[:6])}{', ...' if len(held) > 6 else ''}): "
                "pass --resume to continue the run in it, --overwrite to replace it, or another --output-dir"
            )
        if self.single_process or int(os.environ.get("RANK", "0")) == 0:  # one process deletes
            import shutil

            for name in RUN_OUTPUTS:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            print(f"overwrite: deleted the earlier run's outputs in {out}")

    # ------------------------------------------------------------------ schedule and sampling
    def lr_at(self, step: int) -> float:
        """Learning rate of (0-based) ``step``: linear warm-up, then constant or cosine decay."""
        cfg = self.config
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return cfg.lr
        span = max(1, cfg.steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    def draw(self, step: int) -> List[Tuple[int, ViewSet, object]]:
        """This rank's ``(scene index, view set, subsampled correspondences)`` for ``step``."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step + 1)
        drawn = []
        for _ in range(cfg.batch_sets * self.world_size):
            si = int(torch.randint(len(self.scenes), (1,), generator=g))  # device: CPU generator
            vs = self.pools[si][int(torch.randint(len(self.pools[si]), (1,), generator=g))]  # device: CPU generator
            drawn.append((si, vs, vs.corr.subsample(cfg.num_correspondences, generator=g)))
        return drawn[self.rank * cfg.batch_sets : (self.rank + 1) * cfg.batch_sets]

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> Dict[str, float]:
        """One optimiser step; returns this step's mean losses (averaged over ranks)."""
        cfg = self.config
        net = self.ddp if self.ddp is not None else self.model
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.draw(step)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # on the device: NCCL reduces it, no syncs
        for k, (si, vs, corr) in enumerate(batch):
            data = self.scenes[si]
            images, intr, c2w = data.inputs(vs.views)  # cameras stay on the CPU (the MVFM normalises them there)
            images = images.to(self.device, non_blocking=True)
            base = data.base[torch.as_tensor(vs.views)].to(self.device)
            corr = corr.to(self.device)
            sync = self.ddp is None or k == len(batch) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with compute_precision(self.device, cfg.bf16):
                    feats = net(images, intr, c2w)[0]
                feats = feats.float()  # losses (softmax over cells, norms) in fp32
                l_loc = location_loss(feats, corr, data.size, cfg.temperature)
                l_reg = base_regularizer(feats, base)
                loss = l_loc + cfg.reg_weight * l_reg
                l_nce = torch.zeros((), device=self.device)
                if cfg.nce_weight > 0:
                    l_nce = info_nce_loss(feats, corr, data.size, cfg.nce_temperature)
                    loss = loss + cfg.nce_weight * l_nce
                (loss / len(batch)).backward()
            sums += torch.stack([x.detach().to(sums) for x in (loss, l_loc, l_reg, l_nce)])
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        sums /= len(batch)
        if self.distributed:  # before the optimiser step: every rank sees the same sums and stops together
            dist.all_reduce(sums)
            sums /= self.world_size
        loss, location, regularizer, info_nce, grad_norm = torch.cat([sums, grad_norm.to(sums)[None]]).tolist()
        if not all(math.isfinite(v) for v in (loss, location, regularizer, info_nce, grad_norm)):
            last = latest_checkpoint(self.output_dir)
            raise TrainingDivergedError(
                f"step {step + 1}: non-finite training values (loss {loss}, location {location}, regulariser "
                f"{regularizer}, InfoNCE {info_nce}, gradient norm {grad_norm}); stopped before the optimiser step, "
                f"nothing of this step was written. Last good checkpoint: "
                f"{last[1] if last else 'none (no checkpoint yet)'}. Hint: lower --lr, raise --temperature, or "
                "check the scenes' poses and images"
            )
        self.optimizer.step()
        return {"loss": loss, "location": location, "regularizer": regularizer, "info_nce": info_nce,
                "grad_norm": grad_norm, "lr": self.lr_at(step)}

    def train(self) -> Path:
        """Run (or resume) training to ``config.steps``; returns the final ``adapters.safetensors``."""
        self.setup()
        with torch_threads(self.config.num_threads):
            return self._train()

    def _train(self) -> Path:
        cfg = self.config
        writer = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.output_dir / "config.json", json.dumps(config_to_dict(cfg), indent=2).encode())
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=self.step or None)
        t0 = time.perf_counter()
        with make_progress(enabled=cfg.progress and self.is_main) as progress:
            task = progress.add_task("training", total=cfg.steps, completed=self.step, info="")
            while self.step < cfg.steps:
                stats = self.train_step(self.step)
                self.step += 1
                self.history.append({"step": self.step, **stats})
                progress.update(task, advance=1, info=f"loss {stats['loss']:.4f} loc {stats['location']:.4f}")
                if writer is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    for key, value in stats.items():
                        writer.add_scalar(f"train/{key}", value, self.step)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self._log_eval(writer)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        final = self.output_dir / "adapters.safetensors"
        if self.is_main:
            seconds = {"train_seconds": f"{time.perf_counter() - t0:.1f}"}
            self.model.save_adapters(final, model_metadata(cfg, self.step, seconds))
        self._log_eval(writer)
        if self.is_main and getattr(self, "last_eval", None):
            atomic_write(self.output_dir / "heldout_metrics.json", json.dumps(self.last_eval, indent=2).encode())
        if writer is not None:
            writer.close()
        if self.distributed:
            dist.barrier()
        return final

    # ------------------------------------------------------------------ evaluation
    def heldout_sets(self) -> List[List[ViewSet]]:
        """Fixed held-out evaluation sets per scene (each has >= 1 held-out view); [] for scenes without."""
        if not hasattr(self, "_heldout"):
            cfg = self.config
            self._heldout = []
            for i, data in enumerate(self.scenes):
                sets: List[ViewSet] = []
                if data.heldout_views and cfg.eval_sets > 0:
                    views = min(cfg.num_views, len(data.scene))
                    try:
                        sets = heldout_view_sets(data, views, cfg.eval_sets, cfg.min_shared, cfg.seed + 104729 + i)
                    except ValueError as err:  # no held-out view overlaps enough: nothing to evaluate
                        warnings.warn(f"held-out evaluation skipped: {err}", stacklevel=2)
                self._heldout.append([vs for vs in sets if len(vs.corr) > 0])
        return self._heldout

    def evaluate(self, include_base: bool = True) -> Dict[str, Dict]:
        """Held-out metrics per scene (:meth:`~mvfm_nerfstudio.evaluation.evaluate.EvalResult.summary`)."""
        self.setup()
        out = {}
        for data, sets in zip(self.scenes, self.heldout_sets()):
            if sets:
                out[data.name] = evaluate_sets(self.model, data, sets, include_base=include_base).summary()
        return out

    def _log_eval(self, writer) -> None:
        if not self.is_main or self.config.eval_sets <= 0:
            return
        results = self.evaluate(include_base=True)
        for name, r in results.items():
            if writer is not None:
                for model in ("base", "mvfm"):
                    writer.add_scalar(f"heldout/{name}/loc_err_{model}", r[model]["loc_err"], self.step)
                writer.add_scalar(f"heldout/{name}/base_sim", r["base_sim"], self.step)
        self.last_eval = results

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Optional[Path]:
        """Write adapters + optimiser state for the current step (rank 0; atomic); prune old ones."""
        if not self.is_main:
            return None
        folder = self.output_dir / "checkpoints"
        stem = folder / f"step-{self.step:07d}"
        adapters = stem.with_suffix(".safetensors")
        self.model.save_adapters(adapters, model_metadata(self.config, self.step))
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": json.dumps(config_to_dict(self.config), sort_keys=True),
        }
        with atomic_path(stem.with_suffix(".state.pt")) as tmp:
            torch.save(state, tmp)
        if self.config.keep_checkpoints > 0:
            steps = sorted(int(m.group(1)) for p in folder.glob("step-*.state.pt") if (m := _CKPT.search(p.name)))
            # steps beyond this one belong to an abandoned history (e.g. after falling back to an older checkpoint)
            kept = [s for s in steps if s <= self.step][-self.config.keep_checkpoints:]
            for old in (s for s in steps if s not in kept):
                for suffix in (".safetensors", ".state.pt"):
                    (folder / f"step-{old:07d}{suffix}").unlink(missing_ok=True)
        return adapters

    def _resume(self) -> None:
        """Restore the newest checkpoint that verifies; damaged newer ones are named and moved aside."""
        found = list_checkpoints(self.output_dir)
        if not found:
            if self.is_main:
                print(f"resume: no checkpoint in {self.output_dir / 'checkpoints'}; starting from step 0")
            return
        from safetensors.torch import load_file

        skipped = []
        for step, adapters, state_path in found:
            try:  # reading both files whole verifies them; a damaged one (truncated by a crash) is skipped
                state = torch.load(state_path, map_location="cpu", weights_only=True)
                stored = json.loads(state["config"])
                load_file(str(adapters))
            except Exception as err:  # torch, zipfile, pickle and safetensors raise many types for damaged files
                skipped.append((adapters, state_path, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
                continue
            break
        else:
            names = "\n  ".join(f"{a.name} / {s.name}: {why}" for a, s, why in skipped)
            raise RunFolderError(f"--resume: no checkpoint in {self.output_dir / 'checkpoints'} verifies:\n  {names}")
        differences = config_differences(stored, self.config)
        if differences:
            raise RunFolderError(
                f"--resume: the run in {self.output_dir} was trained with another configuration "
                f"({state_path.name}):\n  " + "\n  ".join(differences)
                + "\nUse the run's flags (its config.json), or --overwrite / another --output-dir to start afresh"
            )
        if int(state.get("version", 0)) > STATE_VERSION:
            raise RunFolderError(
                f"{state_path} was written by a newer mvfm-nerfstudio (state version {state['version']}): upgrade it")
        self.model.load_adapters(adapters)  # a checkpoint that does not fit the model is an error, not damage
        if skipped and self.is_main:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            for a, s_path, why in skipped:
                for f in (a, s_path):
                    f.rename(f.with_name(f"{f.name}.corrupt-{stamp}"))
                print(f"resume: checkpoint {a.name} / {s_path.name} does not verify ({why}); moved aside as "
                      f"*.corrupt-{stamp}")
            print(f"resume: falling back to {adapters.name} / {state_path.name} (step {step})")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        if self.is_main:
            print(f"resumed from {adapters} (step {self.step})")


def _check_config(cfg: TrainConfig) -> None:
    minimum = dict(steps=1, num_views=2, pool_sets=1, batch_sets=1, num_correspondences=1, checkpoint_every=1,
                   log_every=1)
    for name, low in minimum.items():
        if getattr(cfg, name) < low:
            raise ValueError(f"training config: {name} must be >= {low}, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or cfg.temperature <= 0:
        raise ValueError(f"training config: lr and temperature must be > 0, got {cfg.lr}, {cfg.temperature}")
