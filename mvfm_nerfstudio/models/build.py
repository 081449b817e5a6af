"""Building an MVFM: the one place that turns a model description into a model.

:class:`ModelSpec` says *which* model (backbone, weights, adapters, seed, device) and is shared
by every tool (``mvfm-train``, ``mvfm-eval``, ``mvfm-segment``, the feature store, the Nerfstudio
datamanagers and ``mvfm-demo``); :func:`build_model` builds it; :func:`create_mvfm` is the
Python API underneath.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..backbones.registry import DEFAULT_BACKBONE, get_backbone_spec
from ..backbones.vit import WeightsSource, create_backbone
from ..utils.runtime import DeviceLike, resolve_device
from .config import RUNTIME_FIELDS, MVFMConfig
from .mvfm import MultiViewFoundationModel
from .published import is_published_source, load_published, source_metadata

__all__ = ["ModelSpec", "build_model", "create_mvfm", "spec_from_checkpoint", "fixed_feature_grid", "spec_patch_size"]


@dataclass
class ModelSpec:
    """Which multi-view foundation model to build (backbone, weights, adapters, seed, device).

    The configs of the tools extend it (``TrainConfig``, ``FeatureStoreConfig``, ``DemoArgs``), so these
    options are spelled the same everywhere (``--weights``, ``--pipeline.datamanager.features.weights``, ...).
    """

    backbone: str = DEFAULT_BACKBONE
    """Foundation backbone (see `mvfm-info`): dinov2_vits14_reg, dinov3_vits16, clip_vitb16, sam_vitb, ..."""
    weights: str = "pretrained"
    """Backbone weights: 'pretrained' (timm weights from the Hugging Face cache, else the hub; fails within seconds
    offline, naming the options), a local .safetensors/.pth file, or 'random' (tests and demos: features carry no
    meaning)."""
    tiny: bool = False
    """Tiny test-size backbone of the same family (2 blocks, width 64); needs weights='random'. Tests and smoke runs."""
    adapters: Optional[str] = None
    """MV-Adapter checkpoint to load: a .safetensors from mvfm-train (which starts from it when given), or a
    published model with its own fine-tuned backbone: a Hugging Face id such as Leoseg/dinov2_reg (cached or
    downloaded), a folder with args.yaml + checkpoints/best.pth, the .pth, or its mvfm-convert .safetensors
    (backbone, weights and architecture then come from the checkpoint; see `mvfm-info`). None = untrained
    adapters, which reproduce the base model exactly (no multi-view consistency is added)."""
    model_seed: int = 0
    """Torch seed set before building the model: fixes random backbone weights and the adapters' initialisation."""
    device: str = "auto"
    """Device: 'auto' (this process's CUDA GPU if available, else the CPU; inside Nerfstudio: the trainer's
    device), 'cpu', 'cuda' or 'cuda:N'. CUDA runs use TF32 matrix products."""
    bf16: bool = False
    """bf16 autocast of the model's forward on CUDA (about 2x faster; features differ from fp32 by ~1e-2).
    Ignored on the CPU, where bf16 is ~100x slower."""

    def resolve_device(self, default: Optional[DeviceLike] = None) -> torch.device:
        """:attr:`device` as a ``torch.device``; ``default`` is what 'auto' means when given (see
        :func:`~mvfm_nerfstudio.utils.runtime.resolve_device`)."""
        return resolve_device(self.device, default)

    def replace(self, **changes) -> "ModelSpec":
        """A copy with some fields changed (None values are ignored: 'not given')."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def create_mvfm(
    backbone: str,
    weights: WeightsSource = "pretrained",
    tiny: bool = False,
    adapters: Optional[Union[str, Path]] = None,
    text_space: bool = False,
    **config,
) -> MultiViewFoundationModel:
    """Build a multi-view foundation model.

    Args:
        backbone: registered backbone name (:func:`mvfm_nerfstudio.list_backbones`).
        weights: backbone weights: ``"pretrained"`` (timm / Hugging Face cache or hub),
            a local weights file, or ``"random"`` (tests and demos only).
        tiny: tiny random test-size backbone of the same family (``weights="random"`` only).
        adapters: optional adapter checkpoint (``.safetensors``) to load; its stored
            config is used, and any ``config`` given must agree with it. A published model (hub id such as
            ``"Leoseg/dinov2_reg"``, a folder or ``.pth`` in the authors' layout, or an ``mvfm-convert`` file)
            brings its own backbone: ``backbone``/``weights`` must then be left at their defaults or agree
            (:func:`~mvfm_nerfstudio.models.published.load_published`).
        text_space: features in CLIP's joint image-text space (MaskCLIP last block + CLIP's image projection,
            :func:`~mvfm_nerfstudio.backbones.vit.create_backbone`); backbones with a text tower only. The adapters
            run where they always do; only the backbone's last block and head change.
        **config: fields of :class:`~mvfm_nerfstudio.models.config.MVFMConfig` (e.g. ``attention="knn"``,
            ``use_rays=False``).

    Example:
        >>> model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True)
        >>> feats = model(images, intrinsics, cam_to_world)   # [B, S, F, h, w]
    """
    if is_published_source(adapters):
        if text_space:
            raise ValueError(f"text_space=True is not available for the published model {adapters}: none of them has "
                             "a backbone with a CLIP text tower (MV-CLIP's clip_vitb16_laion was fine-tuned on ImageNet)")
        return load_published(adapters, backbone=backbone, weights=weights, tiny=tiny, **config)
    if adapters is not None:
        stored = MVFMConfig.from_dict(json.loads(source_metadata(adapters)["config"]))
        given = MVFMConfig.from_dict(config)
        mismatched = {
            k: (getattr(given, k), getattr(stored, k))
            for k in config
            if k not in RUNTIME_FIELDS and getattr(given, k) != getattr(stored, k)
        }
        if mismatched:
            raise ValueError(
                f"adapter checkpoint {adapters} was trained with a different architecture; "
                f"(given, stored): {mismatched}"
            )
        config = {**stored.to_dict(), **{k: v for k, v in config.items() if k in RUNTIME_FIELDS}}
    model = MultiViewFoundationModel(create_backbone(backbone, weights, tiny=tiny, text_space=text_space),
                                     MVFMConfig.from_dict(config))
    if adapters is not None:
        model.load_adapters(adapters)
    return model


def build_model(spec: ModelSpec, default_device: Optional[DeviceLike] = None, text_space: bool = False,
                **config) -> MultiViewFoundationModel:
    """The MVFM ``spec`` describes, in eval mode on its device.

    The backbone and adapters are built under ``torch.manual_seed(spec.model_seed)`` (without touching the
    caller's random state), so random weights are reproducible from the spec alone.

    Args:
        spec: backbone, weights, adapters, seed and device.
        default_device: what ``spec.device == "auto"`` means (e.g. the Nerfstudio trainer's device).
        text_space: features in CLIP's joint image-text space (see :func:`create_mvfm`).
        **config: :class:`~mvfm_nerfstudio.models.config.MVFMConfig` fields (an adapter checkpoint's stored
            architecture wins; only run-time fields may differ).
    """
    adapters = None if spec.adapters is None else str(Path(spec.adapters).expanduser())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.model_seed)
        model = create_mvfm(spec.backbone, weights=spec.weights, tiny=spec.tiny, adapters=adapters,
                            text_space=text_space, **config)
    return model.to(spec.resolve_device(default_device)).eval()


def spec_from_checkpoint(adapters: Optional[Union[str, Path]], **overrides) -> ModelSpec:
    """The :class:`ModelSpec` an adapter checkpoint was trained with, with ``overrides`` (None = keep) applied.

    Reads the checkpoint's metadata: backbone, tiny, and, for ``mvfm-train`` checkpoints, the weights and
    model seed it was trained with (so a random backbone is rebuilt identically).
    """
    spec = ModelSpec()
    if adapters is not None:
        meta = source_metadata(adapters)
        train = json.loads(meta.get("train_config", "{}"))
        spec = spec.replace(
            backbone=meta.get("backbone"),
            tiny=meta.get("tiny") == "1",
            weights=train.get("weights"),
            model_seed=int(meta["model_seed"]) if "model_seed" in meta else None,
            adapters=str(adapters),
        )
    return spec.replace(**overrides)


def spec_patch_size(spec: ModelSpec) -> int:
    """Pixels per patch side of the model ``spec`` describes, without building it (an adapter checkpoint's stored
    backbone wins over ``spec.backbone``, as in :func:`build_model`): lets callers size inputs while it is built."""
    backbone = source_metadata(spec.adapters)["backbone"] if spec.adapters is not None else spec.backbone
    return get_backbone_spec(backbone).patch_size


def fixed_feature_grid(spec: ModelSpec) -> Optional[Tuple[int, int]]:
    """The feature grid ``(h, w)`` of the spec's model when its architecture fixes the input size (a profile's
    square resize, e.g. the published models' 518 x 518 -> 37 x 37), else None (any size is fine)."""
    if spec.adapters is None:
        return None
    meta = source_metadata(spec.adapters)
    size = MVFMConfig.from_dict(json.loads(meta["config"])).input_size
    if size is None:
        return None
    patch = get_backbone_spec(meta["backbone"]).patch_size
    return size[0] // patch, size[1] // patch
