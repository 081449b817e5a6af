"""The MVFM authors' released models: where they come from, how they load, and their conversion.

A *published source* is any of

* a Hugging Face repo id, e.g. ``"Leoseg/dinov2_reg"`` (:data:`PUBLISHED_MODELS`): read from the Hugging Face
  cache, else downloaded when the hub is reachable; offline and not cached, an error within seconds names the
  options;
* a local folder with ``args.yaml`` and ``checkpoints/best.pth`` (also one level down, ``<folder>/<name>/``,
  the layout ``snapshot_download(local_dir=...)`` gives);
* the ``.pth`` file itself (``args.yaml`` is looked for two levels up);
* a self-contained ``.safetensors`` written by ``mvfm-convert`` (no pickle involved ever again).

Each loads as a :class:`~mvfm_nerfstudio.models.mvfm.MultiViewFoundationModel` with the architecture
profile :meth:`~mvfm_nerfstudio.models.config.MVFMConfig.authors` and the checkpoint's own fine-tuned
backbone (its LoRA merged): no second download. ``create_mvfm(..., adapters=source)``, ``mvfm-eval
--adapters``, ``mvfm-segment --features.adapters`` and the plugins' ``--pipeline.datamanager.features.adapters``
all come here through :func:`~mvfm_nerfstudio.models.build.create_mvfm`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from ..backbones.registry import DEFAULT_BACKBONE
from ..backbones.vit import backbone_from_state_dict, hub_file
from ..errors import CheckpointMismatchError, WeightsUnavailableError
from .authors_layout import (
    AuthorsConversion,
    convert_authors_state_dict,
    read_args_yaml,
    read_authors_checkpoint,
    timm_kwargs_for,
)
from .checkpoint import SELF_CONTAINED_PREFIXES, read_adapter_metadata, save_adapters
from .config import RUNTIME_FIELDS, MVFMConfig
from .lora import merge_lora
from .mvfm import MultiViewFoundationModel

__all__ = [
    "PUBLISHED_MODELS",
    "PublishedModel",
    "ResolvedSource",
    "is_published_source",
    "resolve_source",
    "source_metadata",
    "source_key",
    "load_published",
    "convert_published",
    "cached_published",
    "sam_decoder_state_dict",
]

Source = Union[str, Path]


@dataclass(frozen=True)
class PublishedModel:
    """One of the MVFM authors' released checkpoints."""

    repo_id: str
    variant: str
    description: str


PUBLISHED_MODELS: Dict[str, PublishedModel] = {m.variant: m for m in (
    PublishedModel("Leoseg/dinov2_reg", "dinov2_reg", "MV-DINOv2: DINOv2 ViT-S/14 + registers (the paper's main model)"),
    PublishedModel("Leoseg/dinov2_reg_no_plucker", "dinov2_reg_no_plucker", "MV-DINOv2 without Plücker rays"),
    PublishedModel("Leoseg/dinov3", "dinov3", "MV-DINOv3: DINOv3 ViT-S+/16"),
    PublishedModel("Leoseg/clip", "clip", "MV-CLIP: LAION CLIP ViT-B/16 (timm)"),
    PublishedModel("Leoseg/sam", "sam", "MV-SAM: SAM ViT-B image encoder (+ its mask decoder, kept)"),
)}
"""Variant name -> released model (Hugging Face ``Leoseg/<variant>``)."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHECKPOINT = "checkpoints/best.pth"


@dataclass(frozen=True)
class ResolvedSource:
    """Local files of a published source."""

    label: str
    """What the user gave (hub id or path), for messages and metadata."""
    checkpoint: Path
    """``best.pth`` (authors' layout) or a self-contained ``.safetensors``."""
    args_yaml: Optional[Path]
    variant_hint: Optional[str]
    """The variant the source's name promises (hub id / folder name), checked against the weights."""

    @property
    def self_contained(self) -> bool:
        return self.checkpoint.suffix == ".safetensors"

    def files(self) -> List[Path]:
        return [p for p in (self.args_yaml, self.checkpoint) if p is not None]


def _options(repo_id: Optional[str] = None) -> str:
    """The ways to get a published model (for errors); ``repo_id`` = the one asked for."""
    repo = repo_id or "Leoseg/dinov2_reg"
    cache_dir = f"models--{repo.replace('/', '--')}"
    return (
        "Choose one of:\n"
        f"  adapters='{repo}'  on a machine that can reach huggingface.co (downloaded once into the Hugging Face "
        "cache, then read from there);\n"
        "  copy the cache from a connected machine: there run `python -c \"from huggingface_hub import "
        f"snapshot_download; snapshot_download('{repo}')\"`, then copy ~/.cache/huggingface/hub/{cache_dir} "
        "into this machine's Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub);\n"
        f"  adapters='/path/to/folder'  a local folder with args.yaml and {_CHECKPOINT} (e.g. from `huggingface-cli "
        f"download {repo} --local-dir /path/to/folder`), or the best.pth file itself;\n"
        "  adapters='/path/to/model.safetensors'  a file written by `mvfm-convert` (on any machine)."
    )


def _variant_of_name(name: str) -> Optional[str]:
    return name if name in PUBLISHED_MODELS else None


def is_published_source(source: Optional[Source]) -> bool:
    """Whether ``source`` names a published / authors'-layout model rather than an ``mvfm-train`` adapter file."""
    if source is None:
        return False
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir() or path.suffix in (".pth", ".pt"):
        return True
    if path.suffix == ".safetensors":
        if not path.is_file():
            return False
        try:
            return read_adapter_metadata(path).get("includes_backbone") == "1"
        except Exception:
            return False
    return not path.exists() and bool(_HUB_ID.match(text))


def _folder_files(folder: Path) -> Optional[Tuple[Path, Optional[Path]]]:
    for root in [folder] + sorted(p for p in folder.iterdir() if p.is_dir() and (p / _CHECKPOINT).is_file()):
        if (root / _CHECKPOINT).is_file():
            args = root / "args.yaml"
            return root / _CHECKPOINT, args if args.is_file() else None
    return None


def resolve_source(source: Source) -> ResolvedSource:
    """Local files of a published source (hub download when needed and possible).

    Raises:
        WeightsUnavailableError: a hub id not in the Hugging Face cache while offline (within seconds), naming
            the options; a folder or file that does not hold a checkpoint.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        found = _folder_files(path)
        if found is None:
            raise WeightsUnavailableError(
                f"folder {text!r} holds no {_CHECKPOINT} (nor <name>/{_CHECKPOINT}).\n" + _options())
        ckpt, args = found
        return ResolvedSource(text, ckpt, args, _variant_of_name(ckpt.parent.parent.name))
    if path.suffix in (".pth", ".pt", ".safetensors"):
        if not path.is_file():
            raise WeightsUnavailableError(f"checkpoint file {text!r} does not exist.\n" + _options())
        args = path.parent.parent / "args.yaml" if path.suffix != ".safetensors" else None
        hint = _variant_of_name(path.parent.parent.name) if path.suffix != ".safetensors" else None
        return ResolvedSource(text, path, args if args is not None and args.is_file() else None, hint)
    if not _HUB_ID.match(text):
        raise WeightsUnavailableError(f"{text!r} is neither a file, a folder nor a Hugging Face repo id.\n"
                                      + _options())
    name = text.split("/", 1)[1]
    ckpt = Path(hub_file(text, [_CHECKPOINT, f"{name}/{_CHECKPOINT}"], f"MVFM checkpoint {text}", _options(text)))
    folder = f"{name}/" if ckpt.parent.parent.name == name else ""  # snapshot_download layout: <name>/checkpoints/
    try:
        args: Optional[Path] = Path(hub_file(text, [f"{folder}args.yaml"], f"args.yaml of {text}", _options(text)))
    except WeightsUnavailableError:
        args = None  # the weights alone determine the model; args.yaml only confirms settings
    return ResolvedSource(text, ckpt, args, _variant_of_name(name))


# ---------------------------------------------------------------------------------------------- metadata


def _authors_metadata(resolved: ResolvedSource) -> Dict[str, str]:
    from ..backbones.registry import get_backbone_spec
    from .authors_layout import backbone_for, detect_variant, profile_config

    sd = read_authors_checkpoint(resolved.checkpoint)  # memory-mapped: only key names and shapes are read
    args = read_args_yaml(resolved.args_yaml)
    variant = detect_variant(sd)
    backbone = backbone_for(variant, args)
    spec = get_backbone_spec(backbone)
    width = next(v.shape[0] for k, v in sd.items()
                 if k.endswith(("patch_embed.proj.weight", "patch_embed.proj.base_layer.weight")))
    config = profile_config(variant, args, spec)
    return {"backbone": backbone, "tiny": "0" if int(width) == spec.embed_dim else "1", "config": config.to_json(),
            "backbone_weights": f"checkpoint:{resolved.label}", "includes_backbone": "1",
            "published_variant": variant, "published_source": resolved.label}


def source_metadata(source: Source) -> Dict[str, str]:
    """Checkpoint metadata of any adapter source (``mvfm-train`` file or published source), without building it:
    ``backbone``, ``tiny``, ``config`` (JSON) and, for training runs, what they stored."""
    if not is_published_source(source):
        return read_adapter_metadata(source)
    resolved = resolve_source(source)
    if resolved.self_contained:
        return read_adapter_metadata(resolved.checkpoint)
    return _authors_metadata(resolved)


def source_key(source: Source) -> str:
    """Content key of an adapter source (for caches): a hash of its files' bytes, not of its name."""
    resolved = resolve_source(source) if is_published_source(source) else None
    files = resolved.files() if resolved is not None else [Path(str(source)).expanduser()]
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        try:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError as err:
            raise FileNotFoundError(f"cannot read {str(f)!r} to key the feature cache: {err}") from err
        h.update(b"\0")
    return h.hexdigest()


def cached_published(variant: str) -> Optional[Path]:
    """The Hugging Face cache's ``best.pth`` of a published model, or None (no network)."""
    from huggingface_hub import constants, try_to_load_from_cache

    m = PUBLISHED_MODELS[variant]
    name = m.repo_id.split("/", 1)[1]
    for filename in (_CHECKPOINT, f"{name}/{_CHECKPOINT}"):
        path = try_to_load_from_cache(m.repo_id, filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(path, str) and Path(path).is_file():
            return Path(path)
    return None


# ---------------------------------------------------------------------------------------------- loading


def _check_request(meta_backbone: str, meta_tiny: bool, label: str, backbone: Optional[str], weights: object,
                   tiny: bool) -> None:
    problems = []
    if backbone not in (None, DEFAULT_BACKBONE, meta_backbone):
        problems.append(f"backbone {backbone!r} was asked for, but the checkpoint's backbone is {meta_backbone!r} "
                        "(leave the backbone at its default: the checkpoint decides)")
    if weights not in (None, "pretrained", "checkpoint"):
        problems.append(f"weights={str(weights)!r} was asked for, but {label} carries its own fine-tuned backbone "
                        "(leave weights at its default 'pretrained')")
    if tiny and not meta_tiny:
        problems.append("tiny=True was asked for, but the checkpoint is full size")
    if problems:
        raise CheckpointMismatchError(f"published model {label}: " + "; ".join(problems))


def _runtime_overrides(stored: MVFMConfig, config: Dict[str, object], label: str) -> MVFMConfig:
    given = MVFMConfig.from_dict({**stored.to_dict(), **config}) if config else stored
    mismatched = {k: (getattr(given, k), getattr(stored, k)) for k in config
                  if k not in RUNTIME_FIELDS and getattr(given, k) != getattr(stored, k)}
    if mismatched:
        raise ValueError(f"published model {label} has a fixed architecture; (given, stored): {mismatched}")
    return given


def _assemble(conv: AuthorsConversion, config: MVFMConfig, label: str, weights: str,
              merged: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None) -> MultiViewFoundationModel:
    """The model of a conversion; ``merged`` = LoRA factors already merged into ``conv.backbone_state``."""
    backbone = backbone_from_state_dict(conv.backbone, conv.backbone_state, tiny=conv.tiny, weights=weights,
                                        timm_kwargs=timm_kwargs_for(conv.variant))
    model = MultiViewFoundationModel(backbone, config)
    own = model.adapter_state_dict()
    missing = sorted(set(own) - set(conv.adapters))
    unexpected = sorted(set(conv.adapters) - set(own))
    wrong = [f"{k}: checkpoint {list(conv.adapters[k].shape)}, model {list(own[k].shape)}"
             for k in own if k in conv.adapters and conv.adapters[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(
            f"{label}: adapter tensors do not fit the {conv.variant} profile: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}, wrong shape {wrong[:6]}")
    model.load_state_dict(conv.adapters, strict=False)
    if merged is None and conv.lora:
        merge_lora(backbone, conv.lora, conv.lora_scale)  # once, at load time
        backbone._fingerprint = None  # merged in place: the weights changed
    model.backbone_lora = dict(conv.lora if merged is None else merged)
    model.backbone_lora_scale = float(conv.lora_scale)
    model.extra_tensors = dict(conv.extras)
    model.published = {"published_variant": conv.variant, "published_source": label}
    return model.eval()


def _load_self_contained(path: Path, label: str, backbone: Optional[str], weights: object, tiny: bool,
                         config: Dict[str, object]) -> MultiViewFoundationModel:
    from safetensors.torch import load_file

    meta = read_adapter_metadata(path)
    variant = meta.get("published_variant")
    if variant is None:
        raise CheckpointMismatchError(f"{str(path)!r} holds a backbone but no published_variant metadata")
    tensors = load_file(str(path))
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("lora."):
            name, slot = k[len("lora."):].rsplit(".", 1)
            lora.setdefault(name, {})[slot] = v
    conv = AuthorsConversion(
        variant=variant, backbone=meta["backbone"], tiny=meta.get("tiny") == "1",
        backbone_state={k[len("backbone.model."):]: v for k, v in tensors.items() if k.startswith("backbone.model.")},
        lora={}, lora_scale=float(meta.get("lora_scale", "1.0")),
        adapters={k: v for k, v in tensors.items() if not k.startswith(SELF_CONTAINED_PREFIXES)},
        config=MVFMConfig.from_dict(json.loads(meta["config"])),
        extras={k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")},
    )
    _check_request(conv.backbone, conv.tiny, label, backbone, weights, tiny)
    cfg = _runtime_overrides(conv.config, config, label)
    merged = {n: (ab["A"], ab["B"]) for n, ab in lora.items()}
    model = _assemble(conv, cfg, meta.get("published_source", label), meta.get("backbone_weights", label), merged)
    stored = meta.get("backbone_fingerprint")
    if stored is not None and stored != model.backbone.fingerprint():
        raise CheckpointMismatchError(f"{label}: the stored backbone does not match its fingerprint (corrupt file?)")
    return model


def load_published(
    source: Source,
    backbone: Optional[str] = None,
    weights: object = None,
    tiny: bool = False,
    variant: Optional[str] = None,
    **config,
) -> MultiViewFoundationModel:
    """The MVFM of a published source (see the module docstring), in eval mode on the CPU.

    Args:
        source: hub id, folder, ``.pth`` or converted ``.safetensors``.
        backbone, weights, tiny: what the caller asked for (``ModelSpec`` fields); the checkpoint decides, and a
            request that contradicts it (another backbone, other weights, tiny for a full-size model) is refused.
        variant: the variant the checkpoint must be (default: what the source's name promises, if anything).
        **config: run-time :class:`~mvfm_nerfstudio.models.config.MVFMConfig` fields (attention, neighbours,
            pooling); architecture fields must equal the profile's.

    Raises:
        WeightsUnavailableError: offline and not cached (names the options).
        CheckpointMismatchError: not an authors' checkpoint, or one whose keys/shapes do not fit (named).
    """
    resolved = resolve_source(source)
    label = resolved.label
    if resolved.self_contained:
        model = _load_self_contained(resolved.checkpoint, label, backbone, weights, tiny, config)
        if variant is not None and model.published["published_variant"] != variant:
            raise CheckpointMismatchError(f"{label} is the {model.published['published_variant']!r} model, "
                                          f"not {variant!r}")
        return model
    sd = read_authors_checkpoint(resolved.checkpoint)
    conv = convert_authors_state_dict(sd, read_args_yaml(resolved.args_yaml),
                                      expected_variant=variant or resolved.variant_hint)
    _check_request(conv.backbone, conv.tiny, label, backbone, weights, tiny)
    cfg = _runtime_overrides(conv.config, config, label)
    model = _assemble(conv, cfg, label, f"checkpoint:{label}")
    model.conversion_notes = list(conv.notes)
    return model


def convert_published(source: Source, output: Union[str, Path], variant: Optional[str] = None
                      ) -> Tuple[MultiViewFoundationModel, List[str]]:
    """``mvfm-convert``: load a published source once and write it as a self-contained ``.safetensors``.

    Returns:
        ``(model, notes)``: the loaded model and what the conversion noticed.
    """
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"the converted model is a .safetensors file, got {str(output)!r}")
    model = load_published(source, variant=variant)
    save_adapters(model, output, {"converted_from": str(source)})
    return model, list(getattr(model, "conversion_notes", []))


def sam_decoder_state_dict(source: Source) -> Dict[str, torch.Tensor]:
    """The fine-tuned SAM prompt encoder and mask decoder of a published MV-SAM (SAM's own names, e.g.
    ``mask_decoder.iou_token.weight``): load them into ``segment_anything``'s ``Sam`` with ``strict=False``.

    Raises:
        CheckpointMismatchError: the source is not MV-SAM, or it holds no decoder (stage-1 checkpoint).
    """
    resolved = resolve_source(source)
    if resolved.self_contained:
        from safetensors.torch import load_file

        tensors = {k[len("extra."):]: v for k, v in load_file(str(resolved.checkpoint)).items() if k.startswith("extra.")}
    else:
        sd = read_authors_checkpoint(resolved.checkpoint)
        tensors = {k: v.clone() for k, v in sd.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    if not any(k.startswith("mask_decoder.") for k in tensors):
        raise CheckpointMismatchError(f"{resolved.label} holds no SAM mask decoder (not MV-SAM, or a stage-1 checkpoint)")
    return tensors
