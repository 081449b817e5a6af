"""Surface-normal probes on frozen features: the probe, its frames, features, prediction and checkpoints.

A :class:`NormalProbe` is a :class:`~mvfm_nerfstudio.probes.head.MultiViewNormalHead` plus what it was trained
on: which backbone blocks it reads (``layers``), which features (``"base"`` or ``"mvfm"``) and the frame of its
normals:

* ``"camera"``: each view's OpenCV camera frame (x right, y down, z forward);
* ``"world"``: the scene's world frame (the head must infer the camera's orientation from the features);
* ``"reference"``: the camera frame of the set's first view. MVFM features are computed from cameras
  normalised to that view (METHOD.md), so this is the frame a pose-aware MVFM can know; a base model
  sees no pose at all.

Use :func:`predict_normals` to run a model and a probe on posed images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..errors import CheckpointMismatchError
from ..geometry.normals import rotate_normals, world_to_camera_normals
from ..models.mvfm import MultiViewFoundationModel
from ..utils.io import atomic_path
from .head import MultiViewNormalHead, NormalHeadConfig, upsample_normals

__all__ = [
    "NormalProbe",
    "NormalPrediction",
    "default_layers",
    "extract_layers",
    "predict_normals",
    "target_from_camera",
    "world_from_target",
    "save_probe",
    "load_probe",
    "PROBE_FORMAT",
]

PROBE_FORMAT = "mvfm-normal-head"
"""``format`` metadata of head checkpoints."""

FEATURES = ("base", "mvfm")
FRAMES = ("camera", "world", "reference")


def default_layers(depth: int) -> Tuple[int, ...]:
    """Four evenly spaced blocks ending at the last (``(2, 5, 8, 11)`` for 12 blocks); fewer for tiny models."""
    return tuple(sorted({max(0, round((k + 1) * depth / 4) - 1) for k in range(4)}))


def target_from_camera(cam_to_world: torch.Tensor, frame: str) -> torch.Tensor:
    """Rotations ``[..., S, 3, 3]`` taking each view's camera-frame normals to ``frame`` (see module docstring).

    ``cam_to_world``: ``[..., S, 4, 4]`` OpenCV poses of one or more sets (view 0 = reference).
    """
    rot = cam_to_world[..., :3, :3].double()
    if frame == "camera":
        return torch.eye(3, dtype=torch.float64, device=rot.device).expand_as(rot).clone()
    if frame == "world":
        return rot
    if frame == "reference":
        return rot[..., :1, :, :].transpose(-1, -2) @ rot
    raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")


def world_from_target(cam_to_world: torch.Tensor, frame: str) -> torch.Tensor:
    """Rotations ``[..., S, 3, 3]`` taking ``frame`` normals of each view to the world frame."""
    rot = cam_to_world[..., :3, :3].double()
    if frame == "camera":
        return rot
    if frame == "world":
        return torch.eye(3, dtype=torch.float64, device=rot.device).expand_as(rot).clone()
    if frame == "reference":
        return rot[..., :1, :, :].expand_as(rot).clone()
    raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")


class NormalProbe(nn.Module):
    """A normal head and what it reads.

    Args:
        head: the head.
        layers: backbone block indices (non-negative) whose tokens it reads, in the head's input order.
        features: ``"base"`` or ``"mvfm"``.
        frame: ``"camera"``, ``"world"`` or ``"reference"``.
        backbone: backbone name the head was trained on (checked against the model).
    """

    def __init__(self, head: MultiViewNormalHead, layers: Sequence[int], features: str, frame: str, backbone: str):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
        if frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
        if len(layers) != len(head.config.in_dims):
            raise ValueError(f"{len(layers)} layers for a head reading {len(head.config.in_dims)}")
        self.head = head
        self.layers = tuple(int(x) for x in layers)
        self.features = features
        self.frame = frame
        self.backbone = backbone

    def check_model(self, model: MultiViewFoundationModel) -> None:
        """Raise :class:`CheckpointMismatchError` if ``model`` cannot feed this probe."""
        name = model.backbone.spec.name
        dims = tuple([model.backbone.embed_dim] * len(self.layers))
        if name != self.backbone or dims != tuple(self.head.config.in_dims) or max(self.layers) >= model.backbone.depth:
            raise CheckpointMismatchError(
                f"the normal head was trained on {self.backbone} features of width {self.head.config.in_dims[0]} from "
                f"blocks {list(self.layers)}, but the model is {name} (width {model.backbone.embed_dim}, "
                f"{model.backbone.depth} blocks): build the model the head was trained with"
            )


@dataclass
class NormalPrediction:
    """Output of :func:`predict_normals` (all at the image size ``H x W``)."""

    normals: torch.Tensor
    """``[B, S, 3, H, W]`` unit normals in the probe's frame."""
    world: torch.Tensor
    """``[B, S, 3, H, W]`` the same normals in the world frame."""
    camera: torch.Tensor
    """``[B, S, 3, H, W]`` the same normals in each view's OpenCV camera frame."""
    kappa: Optional[torch.Tensor]
    """``[B, S, H, W]`` predicted concentration (higher = more confident), or None."""


@torch.no_grad()
def extract_layers(
    model: MultiViewFoundationModel, images: torch.Tensor, intrinsics: torch.Tensor, cam_to_world: torch.Tensor,
    layers: Sequence[int], features: str,
) -> List[torch.Tensor]:
    """Frozen intermediate features ``[B, S, C, h, w]`` per layer: the MVFM's (with cameras) or the base model's."""
    if features == "mvfm":
        return model(images, intrinsics, cam_to_world, return_layers=layers)[1]
    if features == "base":
        return model.forward_base(images, return_layers=layers)[1]
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")


@torch.no_grad()
def predict_normals(
    model: MultiViewFoundationModel,
    head: NormalProbe,
    images: torch.Tensor,
    intrinsics: torch.Tensor,
    cam_to_world: torch.Tensor,
) -> NormalPrediction:
    """Surface normals of posed views.

    Args:
        model: the MVFM the probe was trained on (built from the same :class:`~mvfm_nerfstudio.models.build.ModelSpec`).
        head: a trained :class:`NormalProbe` (:func:`load_probe`).
        images: ``[B, S, 3, H, W]`` float in [0, 1], H and W multiples of the patch size.
        intrinsics: ``[B, S, 3, 3]`` pinhole K in pixels of these images.
        cam_to_world: ``[B, S, 4, 4]`` OpenCV camera-to-world; view 0 of each set is the reference view.

    Returns:
        :class:`NormalPrediction` at the image size.
    """
    head.check_model(model)
    device = next(head.parameters()).device
    feats = extract_layers(model, images, intrinsics, cam_to_world, head.layers, head.features)
    normals, kappa = head.head([f.to(device) for f in feats])
    size = tuple(images.shape[-2:])
    normals = upsample_normals(normals, size)
    if kappa is not None:
        kappa = torch.nn.functional.interpolate(kappa.flatten(0, 1)[:, None], size=size, mode="bilinear",
                                                align_corners=False)[:, 0].view(*kappa.shape[:2], *size)
    c2w = cam_to_world.to(device)
    world = rotate_normals(normals, world_from_target(c2w, head.frame))
    camera = world_to_camera_normals(world, c2w)
    return NormalPrediction(normals=normals, world=world, camera=camera, kappa=kappa)


def save_probe(probe: NormalProbe, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the head as safetensors (atomic) with its config, layers, features, frame and backbone as metadata."""
    from safetensors.torch import save_file

    meta = {
        "format": PROBE_FORMAT,
        "version": "1",
        "head_config": probe.head.config.to_json(),
        "layers": json.dumps(list(probe.layers)),
        "features": probe.features,
        "frame": probe.frame,
        "backbone": probe.backbone,
        **(metadata or {}),
    }
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in probe.head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    return path


def load_probe(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> Tuple[NormalProbe, Dict[str, str]]:
    """Read a head checkpoint written by :func:`save_probe`: ``(probe in eval mode, metadata)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(
            f"normal head checkpoint {path} does not exist (train one with `mvfm-normals train`)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except Exception as err:  # noqa: BLE001 - any read failure means a damaged or foreign file
        raise CheckpointMismatchError(f"could not read normal head checkpoint {path}: {err}") from None
    if meta.get("format") != PROBE_FORMAT:
        raise CheckpointMismatchError(
            f"{path} is not a normal head checkpoint (format {meta.get('format')!r}, expected {PROBE_FORMAT!r}); "
            "adapter checkpoints go to --adapters"
        )
    head = MultiViewNormalHead(NormalHeadConfig.from_json(meta["head_config"]))
    missing, unexpected = head.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointMismatchError(f"normal head checkpoint {path} does not fit its own config: missing {missing}, "
                                      f"unexpected {unexpected}")
    probe = NormalProbe(head, json.loads(meta["layers"]), meta["features"], meta["frame"], meta["backbone"])
    return probe.to(device).eval(), meta
