"""The MVFM authors' checkpoint layout (``best.pth`` of ``Leoseg/*``) and its conversion to this package's model.

Their ``CheckPoint.save`` writes ``{"model": state_dict, "n", "optimizer", "lr_scheduler"}``, where
``state_dict`` is that of their outer module. Its key names depend on the variant (which module peft
wrapped for LoRA, and the backbone's own code):

=====================  =============================  =======================================================
variant                backbone keys                  adapters / rays
=====================  =============================  =======================================================
dinov2_reg(_no_plucker) ``vit.base_model.model.*``      ``spatial_adapters.*``, ``plucker_embed.proj.*``
                       (torch.hub DINOv2 names)
dinov3                 ``base_model.model.*`` with    inside the peft wrapper (frozen there, so inert)
                       LoRA, else top level (their
                       modified DINOv3 ViT-S+/16)
clip                   ``base_model.model.*`` (timm   ``spatial_adapters.*``, ``plucker_embed.proj.*``
                       ``vit_base_patch16_clip_384``)
sam                    ``image_encoder.*`` (SAM        ``image_encoder.spatial_adapters.*``,
                       ViT-B), no LoRA; plus           ``image_encoder.plucker_embed.proj.*``
                       ``prompt_encoder.*``,
                       ``mask_decoder.*``
=====================  =============================  =======================================================

peft's LoRA layers appear as ``<layer>.base_layer.{weight,bias}``, ``<layer>.lora_A.default.weight``
``[r, in(, kh, kw)]`` and ``<layer>.lora_B.default.weight`` ``[out, r(, 1, 1)]``; the scale is
``lora_alpha / r``. Adapters 2..L are one module in their code, stored once per block
(``spatial_adapters.1`` ... ``spatial_adapters.{L-1}``, equal tensors). The full key-mapping tables are in
``docs/published_models.md``. :func:`convert_authors_state_dict` checks every key and shape and names
the offending ones.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from ..backbones.registry import get_backbone_spec
from ..errors import CheckpointMismatchError
from .config import AUTHORS_VARIANTS, MVFMConfig
from .lora import LoRAFactors, lora_delta_shape

__all__ = [
    "AuthorsConversion",
    "convert_authors_state_dict",
    "detect_variant",
    "read_authors_checkpoint",
    "read_args_yaml",
    "backbone_for",
    "timm_kwargs_for",
    "profile_config",
    "ADAPTER_KEY_MAP",
]

StateDict = Dict[str, torch.Tensor]

ADAPTER_KEY_MAP = (
    ("norm.", "norm."),
    ("spatial_attn.qkv.", "attn.qkv."),
    ("spatial_attn.proj.", "attn.proj."),
    ("zero_conv.", "out_proj."),
    ("ffn.fc1.", "mlp.0."),
    ("ffn.fc2.", "mlp.2."),
)
"""Authors' ``DinoSpatialAdapter`` submodule -> this package's :class:`~mvfm_nerfstudio.models.mvfm.AuthorsAdapter`."""

_DINOV2_BACKBONES = {"vits14_reg": "dinov2_vits14_reg", "vits14": "dinov2_vits14",
                     "vitb14_reg": "dinov2_vitb14_reg", "vitb14": "dinov2_vitb14"}
_DEFAULT_BACKBONE = {"dinov2_reg": "dinov2_vits14_reg", "dinov2_reg_no_plucker": "dinov2_vits14_reg",
                     "dinov3": "dinov3_vits16plus_qkvb", "clip": "clip_vitb16_laion", "sam": "sam_vitb"}
# variant -> (prefix of the backbone keys, renames authors' -> timm within them)
_RENAMES: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "dinov2": (("register_tokens", "reg_token"),),
    "dinov3": (("storage_tokens", "reg_token"), (".ls1.gamma", ".gamma_1"), (".ls2.gamma", ".gamma_2"),
               (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2."),
               ("rope_embed.periods", "rope.periods")),
    "clip": (),
    "sam": ((".mlp.lin1.", ".mlp.fc1."), (".mlp.lin2.", ".mlp.fc2.")),
}


def _family(variant: str) -> str:
    return "dinov2" if variant.startswith("dinov2") else variant


def backbone_for(variant: str, args: Optional[Mapping[str, object]] = None) -> str:
    """Registry backbone of an authors' variant (DINOv2 size from ``args.yaml``'s ``model_name``)."""
    if variant.startswith("dinov2") and args and args.get("model_name"):
        name = str(args["model_name"])
        if name not in _DINOV2_BACKBONES:
            raise CheckpointMismatchError(f"args.yaml model_name {name!r} is not one of {sorted(_DINOV2_BACKBONES)}")
        return _DINOV2_BACKBONES[name]
    return _DEFAULT_BACKBONE[variant]


def timm_kwargs_for(variant: str) -> Dict[str, object]:
    """timm constructor overrides an authors' variant needs (SAM's image encoder uses LayerNorm eps 1e-6,
    timm's samvit 1e-5)."""
    if variant == "sam":
        from functools import partial

        return {"norm_layer": partial(torch.nn.LayerNorm, eps=1e-6)}
    return {}


# ---------------------------------------------------------------------------------------------- reading


def read_authors_checkpoint(path: Path) -> StateDict:
    """The model state dict of an authors' checkpoint file (``torch.load(weights_only=True)`` only).

    Accepts their ``{"model": state_dict, ...}`` file or a bare state dict.

    Raises:
        CheckpointMismatchError: the file needs code to unpickle (refused), is unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        try:  # memory-mapped: reading key names and shapes costs nothing
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # the legacy (non-zip) format
    except pickle.UnpicklingError as err:
        needs = _unsafe_globals(path)
        if not needs and "global" not in str(err).lower():  # not a pickle of objects: a damaged file
            raise CheckpointMismatchError(f"could not read checkpoint {str(path)!r}: {err}") from err
        raise CheckpointMismatchError(
            f"{str(path)!r} needs code to unpickle (it stores Python objects{': ' + ', '.join(needs) if needs else ''}"
            ", not only tensors), so it is refused: only torch.load(weights_only=True) is used, never arbitrary "
            "unpickling. Re-save its tensors where you trust the file: torch.save({'model': ckpt['model']}, path)."
        ) from err
    except Exception as err:
        raise CheckpointMismatchError(f"could not read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from err
    sd = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointMismatchError(
            f"{str(path)!r} is not an MVFM authors' checkpoint: expected {{'model': state_dict}} or a state dict of tensors"
        )
    return dict(sd)


def _unsafe_globals(path: Path) -> List[str]:
    """Python globals a checkpoint's pickle would import (empty when unknown or none)."""
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is None:
        return []
    try:
        return list(finder(str(path)))
    except Exception:
        return []


def read_args_yaml(path: Optional[Path]) -> Dict[str, object]:
    """The training arguments ``args.yaml`` next to an authors' checkpoint ({} when absent)."""
    if path is None or not Path(path).is_file():
        return {}
    import yaml

    try:
        args = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise CheckpointMismatchError(f"args.yaml {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(args, dict):
        raise CheckpointMismatchError(f"args.yaml {str(path)!r} is not a mapping of training arguments")
    return args


def detect_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """Which authors' variant a state dict is, from its key names (and adapter 0's width for the Plücker-free one).

    Raises:
        CheckpointMismatchError: an unknown layout, or their OpenAI-CLIP path (not supported: see the docs).
    """
    keys = list(sd)
    if any(k.startswith("vit.") for k in keys):
        norm = sd.get("spatial_adapters.0.norm.weight")
        width = _dinov2_width(sd)
        if norm is not None and width is not None and norm.shape[0] == width:
            return "dinov2_reg_no_plucker"
        return "dinov2_reg"
    if any(k.startswith("image_encoder.") for k in keys):
        return "sam"
    if any(k.startswith("visual.") for k in keys):
        raise CheckpointMismatchError(
            "this checkpoint is the authors' OpenAI-CLIP MV-CLIP (keys 'visual.base_model.model.*'), which is not "
            "supported: in that code path peft froze the adapters at zero (the model is CLIP + LoRA) and its "
            "MultiheadAttention LoRA layout depends on the peft version. The published evaluation uses the timm "
            "CLIP path (keys 'base_model.model.blocks.*'), which is supported."
        )
    if any(k.endswith("storage_tokens") for k in keys):
        return "dinov3"
    if any(k.endswith("norm_pre.weight") for k in keys):
        return "clip"
    shown = ", ".join(keys[:6])
    raise CheckpointMismatchError(f"unknown checkpoint layout (first keys: {shown}); not one of the MVFM authors' "
                                  f"variants {', '.join(AUTHORS_VARIANTS)}")


def _dinov2_width(sd: Mapping[str, torch.Tensor]) -> Optional[int]:
    for k, v in sd.items():
        if k.startswith("vit.") and k.endswith("cls_token"):
            return int(v.shape[-1])
    return None


# ---------------------------------------------------------------------------------------------- conversion


@dataclass
class AuthorsConversion:
    """An authors' checkpoint in this package's terms (timm backbone names, :class:`AuthorsAdapter` names)."""

    variant: str
    backbone: str
    """Registry backbone name."""
    tiny: bool
    backbone_state: StateDict
    """timm names, LoRA not merged (the base weights)."""
    lora: LoRAFactors
    """``model.<timm name>`` -> (A, B) (names as in :class:`~mvfm_nerfstudio.backbones.vit.FoundationBackbone`)."""
    lora_scale: float
    adapters: StateDict
    """Tensors of :meth:`~mvfm_nerfstudio.models.mvfm.MultiViewFoundationModel.adapter_state_dict`."""
    config: MVFMConfig
    extras: StateDict = field(default_factory=dict)
    """Kept but not run: SAM's ``prompt_encoder.*`` / ``mask_decoder.*`` (SAM names, stored dtype)."""
    notes: List[str] = field(default_factory=list)
    """What the conversion found worth telling (inert adapters, unused tensors, defaults assumed)."""


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def split_peft(sd: Mapping[str, torch.Tensor]) -> Tuple[StateDict, Dict[str, Dict[str, torch.Tensor]], Dict[str, str]]:
    """Undo peft's renaming: ``x.base_layer.w`` -> ``x.w``; LoRA factors collected per target ``x.weight``.

    Returns:
        ``(plain, lora, origin)``: plain tensors, ``{"x.weight": {"A": ..., "B": ...}}``, and for every plain /
        LoRA name the checkpoint key it came from (for error messages).
    """
    plain: StateDict = {}
    lora: Dict[str, Dict[str, torch.Tensor]] = {}
    origin: Dict[str, str] = {}
    for k, v in sd.items():
        for part, slot in ((".lora_A.default.weight", "A"), (".lora_B.default.weight", "B")):
            if k.endswith(part):
                target = k[: -len(part)] + ".weight"
                lora.setdefault(target, {})[slot] = v
                origin[f"{target}:{slot}"] = k
                break
        else:
            name = k.replace(".base_layer.", ".")
            plain[name] = v
            origin[name] = k
    return plain, lora, origin


def _rename(plain: StateDict, origin: Dict[str, str], renames: Tuple[Tuple[str, str], ...]) -> Tuple[StateDict, Dict[str, str]]:
    out, out_origin = {}, {}
    for k, v in plain.items():
        new = k
        for a, b in renames:
            new = new.replace(a, b)
        out[new] = v
        out_origin[new] = origin.get(k, k)
    return out, out_origin


def _fmt(keys: List[str], describe: Callable[[str], str], limit: int = 8) -> str:
    shown = ", ".join(describe(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


@functools.lru_cache(maxsize=16)
def _expected_backbone(name: str, tiny: bool, variant: str) -> StateDict:
    """timm state-dict layout (meta tensors: shapes only) of a backbone, as the authors' variant builds it."""
    from ..backbones.vit import _create_timm_model

    spec = get_backbone_spec(name)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = _create_timm_model(spec, tiny, pretrained=False, **timm_kwargs_for(variant))
    own = dict(model.state_dict())
    rope = getattr(model, "rope", None)
    if rope is not None and hasattr(rope, "periods"):
        own["rope.periods"] = rope.periods  # a buffer timm does not save; the authors' checkpoints carry it
    return own


def _check_backbone(given: StateDict, origin: Dict[str, str], own: StateDict, where: str,
                    flexible: Tuple[str, ...] = ()) -> Tuple[Optional[str], int]:
    """Report of keys missing / unexpected / wrong-shape (in the checkpoint's own names), or None when they fit;
    and the number of wrong shapes."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = [k for k in own if k in given and k not in flexible and tuple(given[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return None, 0
    lines = []
    if missing:
        lines.append("missing: " + _fmt(missing, lambda k: f"{where}{k} {list(own[k].shape)}"))
    if unexpected:
        lines.append("unexpected: " + _fmt(unexpected, lambda k: f"{origin.get(k, k)} {list(given[k].shape)}"))
    if wrong:
        lines.append("wrong shape: " + _fmt(
            wrong, lambda k: f"{origin.get(k, k)}: checkpoint {list(given[k].shape)}, expected {list(own[k].shape)}"))
    return "\n  ".join(lines), len(wrong)


def _fit_backbone(name: str, variant: str, given: StateDict, origin: Dict[str, str], where: str,
                  flexible: Tuple[str, ...]) -> bool:
    """Whether ``given`` is the full-size (False) or tiny (True) ``name``; raises naming the offending keys."""
    full, full_wrong = _check_backbone(given, origin, _expected_backbone(name, False, variant), where, flexible)
    if full is None:
        return False
    tiny, tiny_wrong = _check_backbone(given, origin, _expected_backbone(name, True, variant), where, flexible)
    if tiny is None:
        return True
    # report against the size the shapes are closest to (a missing key in a tiny test checkpoint, say)
    report, size = (tiny, "its tiny test size") if tiny_wrong < full_wrong else (full, "full size")
    hint = "; another backbone size or a different model?" if min(full_wrong, tiny_wrong) else ""
    raise CheckpointMismatchError(
        f"the checkpoint's {variant} backbone does not fit {name!r} ({get_backbone_spec(name).description}, "
        f"{size}){hint}\n  {report}"
    )


def _convert_lora(lora: Dict[str, Dict[str, torch.Tensor]], origin: Dict[str, str],
                  renames: Tuple[Tuple[str, str], ...], own: StateDict, drop: Callable[[str], bool],
                  args: Mapping[str, object], notes: List[str]) -> Tuple[LoRAFactors, float]:
    factors: LoRAFactors = {}
    ranks = set()
    for target, ab in lora.items():
        if set(ab) != {"A", "B"}:
            have = [origin[f"{target}:{s}"] for s in ab]
            raise CheckpointMismatchError(f"LoRA layer {target} has only {have}: lora_A and lora_B come in pairs")
        name = target
        for a, b in renames:
            name = name.replace(a, b)
        if drop(name):
            continue
        if name not in own:
            raise CheckpointMismatchError(
                f"LoRA factors {origin[f'{target}:A']} target {name}, which the backbone does not have")
        a, b = ab["A"], ab["B"]
        ranks.add(int(a.shape[0]))
        try:
            delta_shape = lora_delta_shape(a, b)
        except ValueError as err:
            raise CheckpointMismatchError(f"{origin[f'{target}:A']}: {err}") from err
        if tuple(delta_shape) != tuple(own[name].shape):
            raise CheckpointMismatchError(
                f"LoRA factors {origin[f'{target}:A']} {list(a.shape)} / {origin[f'{target}:B']} {list(b.shape)} "
                f"give a delta of shape {list(delta_shape)}, but the weight is {list(own[name].shape)}")
        factors["model." + name] = (a.float().clone(), b.float().clone())  # own memory, not the file's map
    if len(ranks) > 1:
        raise CheckpointMismatchError(f"LoRA layers of different ranks {sorted(ranks)}: one LoraConfig has one rank")
    if not factors:
        return factors, 1.0
    rank = ranks.pop()
    if "lora_r" in args and int(args["lora_r"]) != rank:
        raise CheckpointMismatchError(f"args.yaml says lora_r={args['lora_r']}, the LoRA factors have rank {rank}")
    alpha = float(args.get("lora_alpha", 32))
    if "lora_alpha" not in args:
        notes.append(f"no lora_alpha in args.yaml: assumed 32 (every published config), scale {alpha / rank:g}")
    return factors, alpha / rank


def _adapter_tensors(sd: StateDict, depth: int, prefix: str, has_ffn: bool) -> Tuple[StateDict, List[str]]:
    """Authors' ``spatial_adapters.{0..L-1}`` -> our ``adapters.{0,1}``; checks slots 2..L-1 repeat slot 1."""
    src = _strip(sd, prefix + "spatial_adapters.")
    out: StateDict = {}
    problems: List[str] = []
    parts = [p for p in ADAPTER_KEY_MAP if has_ffn or not p[0].startswith("ffn.")]
    for slot in range(depth):
        target = 0 if slot == 0 else 1
        for theirs, mine in parts:
            for leaf in ("weight", "bias"):
                key = f"{slot}.{theirs}{leaf}"
                if key not in src:
                    problems.append(f"missing: {prefix}spatial_adapters.{key}")
                    continue
                t = src[key].float()
                if theirs == "zero_conv.":
                    if leaf == "weight" and (t.ndim != 3 or t.shape[-1] != 1):
                        problems.append(f"{prefix}spatial_adapters.{key} {list(t.shape)} is not a 1x1 Conv1d weight")
                        continue
                    t = t[..., 0] if leaf == "weight" else t
                name = f"adapters.{target}.{mine}{leaf}"
                if slot >= 2:
                    if name in out and (out[name].shape != t.shape or not torch.equal(out[name], t)):
                        problems.append(f"{prefix}spatial_adapters.{key} differs from spatial_adapters.1 (their code "
                                        "shares one module for blocks 2..L)")
                    continue
                out[name] = t.contiguous()
    known = {f"{s}.{theirs}{leaf}" for s in range(depth) for theirs, _ in parts for leaf in ("weight", "bias")}
    extra = sorted(set(src) - known)
    if extra:
        problems.append("unexpected: " + _fmt([prefix + "spatial_adapters." + k for k in extra],
                                             lambda k: f"{k} {list(sd[k].shape)}"))
    return out, problems


def convert_authors_state_dict(
    sd: Mapping[str, torch.Tensor],
    args: Optional[Mapping[str, object]] = None,
    expected_variant: Optional[str] = None,
) -> AuthorsConversion:
    """Map an authors' state dict to a timm backbone + LoRA factors + this package's adapter tensors.

    Args:
        sd: the ``"model"`` state dict of their checkpoint.
        args: their ``args.yaml`` ({} / None when absent: the variant's published settings are assumed).
        expected_variant: the variant the caller expects (e.g. from the hub id); another one is refused.

    Raises:
        CheckpointMismatchError: wrong variant, missing / unexpected keys, wrong shapes (another backbone size),
            LoRA factors that do not fit, unshared adapters; the message names the keys and shapes.
    """
    args = dict(args or {})
    sd = dict(sd)
    variant = detect_variant(sd)
    if expected_variant is not None and expected_variant != variant:
        raise CheckpointMismatchError(
            f"expected the authors' {expected_variant!r} checkpoint, but the keys are those of {variant!r}: "
            + _variant_evidence(sd, variant))
    fam = _family(variant)
    notes: List[str] = []
    _check_args(args, variant)
    backbone = backbone_for(variant, args)
    spec = get_backbone_spec(backbone)

    # ---- split into backbone / adapters / rays / extras
    if fam == "dinov2":
        prefix = "vit.base_model.model." if any(k.startswith("vit.base_model.model.") for k in sd) else "vit."
        adapter_prefix = ""
    elif fam == "dinov3":
        prefix = "base_model.model." if any(k.startswith("base_model.model.") for k in sd) else ""
        adapter_prefix = prefix
    elif fam == "clip":
        prefix = "base_model.model." if any(k.startswith("base_model.model.") for k in sd) else ""
        adapter_prefix = ""
    else:
        prefix = adapter_prefix = "image_encoder."
    rays_key = adapter_prefix + "plucker_embed.proj."
    not_backbone = (adapter_prefix + "spatial_adapters.", rays_key)
    extras = {k: v.clone() for k, v in sd.items() if fam == "sam" and k.startswith(("prompt_encoder.", "mask_decoder."))}
    body = {k[len(prefix):]: v for k, v in sd.items()
            if k.startswith(prefix) and not k.startswith(not_backbone) and k not in extras}
    leftover = sorted(k for k in sd if not k.startswith(prefix) and not k.startswith(not_backbone) and k not in extras)
    if leftover:
        raise CheckpointMismatchError(f"unexpected keys for the authors' {variant} layout: "
                                      + _fmt(leftover, lambda k: f"{k} {list(sd[k].shape)}"))

    plain, lora, origin = split_peft(body)
    origin = {k: prefix + v for k, v in origin.items()}
    renames = _RENAMES[fam]
    lora_origin = {k: v for k, v in origin.items() if ":" in k}  # "<target>:A" / ":B" -> checkpoint key
    plain, origin = _rename(plain, origin, renames)
    origin.update(lora_origin)
    plain = {k: v.float() if v.is_floating_point() else v for k, v in plain.items()}
    drop, flexible = _special_tensors(variant, plain, origin, notes)

    # ---- backbone: exact timm keys and shapes (full size or the tiny test size)
    tiny = _fit_backbone(backbone, variant, plain, origin, prefix, flexible)
    own = _expected_backbone(backbone, tiny, variant)
    factors, scale = _convert_lora(lora, origin, renames, own, drop, args, notes)

    # ---- adapters and rays
    config = profile_config(variant, args, spec, notes)
    depth = int(sum(1 for k in own if k.startswith("blocks.") and k.endswith(".norm1.weight")))
    has_ffn = config.mlp_ratio > 0
    adapters, problems = _adapter_tensors(sd, depth, adapter_prefix, has_ffn)
    if not has_ffn and any(k.startswith(adapter_prefix + "spatial_adapters.0.ffn.") for k in sd):
        problems.append(f"{variant} adapters have no FFN in the authors' code, but this checkpoint has "
                        f"{adapter_prefix}spatial_adapters.*.ffn.*")
    ray_w, ray_b = sd.get(rays_key + "weight"), sd.get(rays_key + "bias")
    if ray_w is None or ray_b is None:
        problems.append(f"missing: {rays_key}weight / {rays_key}bias")
    elif config.use_rays:
        adapters["ray_embed.weight"], adapters["ray_embed.bias"] = ray_w.float().contiguous(), ray_b.float().contiguous()
    else:
        expect = (spec.embed_dim if not tiny else int(own["patch_embed.proj.weight"].shape[0]), 6)
        if tuple(ray_w.shape[:2]) != expect:
            problems.append(f"{rays_key}weight {list(ray_w.shape)}: the Plücker-free model stores an unused "
                            f"[{expect[0]}, 6, p, p] embedding")
        notes.append(f"{rays_key}* {list(ray_w.shape)} is unused by the Plücker-free model (never trained): dropped")
    if problems:
        raise CheckpointMismatchError(f"the authors' {variant} adapters do not fit:\n  " + "\n  ".join(problems))
    zero = [k for k in ("adapters.0.out_proj.weight", "adapters.1.out_proj.weight") if k in adapters
            and not adapters[k].any() and not adapters[k.replace("weight", "bias")].any()]
    if len(zero) == 2:
        notes.append("every adapter's zero_conv is exactly zero: the adapters are inert (peft froze them in the "
                     "authors' training), so this model is the backbone + LoRA")
    return AuthorsConversion(
        variant=variant, backbone=backbone, tiny=tiny, backbone_state=plain, lora=factors, lora_scale=scale,
        adapters=adapters, config=config, extras=extras, notes=notes,
    )


def _variant_evidence(sd: Mapping[str, torch.Tensor], variant: str) -> str:
    if variant.startswith("dinov2"):
        k = "spatial_adapters.0.norm.weight"
        return f"{k} {list(sd[k].shape) if k in sd else 'absent'} (the token width is {_dinov2_width(sd)})"
    for k in sd:
        return f"first key {k} {list(sd[k].shape)}"
    return "empty"


def _check_args(args: Mapping[str, object], variant: str) -> None:
    """Settings in args.yaml that the weights cannot show but the forward depends on."""
    if "disable_plucker" in args and bool(args["disable_plucker"]) != (variant == "dinov2_reg_no_plucker"):
        raise CheckpointMismatchError(
            f"args.yaml says disable_plucker={args['disable_plucker']}, but the weights are the {variant!r} variant")
    if variant != "dinov3" and bool(args.get("spatial_reduction", False)):
        raise CheckpointMismatchError(f"args.yaml says spatial_reduction=True; the authors' {variant} models do not "
                                      "pool (only DINOv3 does), and this loader does not support it there")
    for flag in ("use_sa_cls_token", "plucker_mlp", "inflated_attn", "use_epipolar_attention", "normalize_plucker",
                 "disable_dino_pe", "disable_3d", "sa_layers"):
        if args.get(flag):
            raise CheckpointMismatchError(f"args.yaml sets {flag}={args[flag]!r}, which none of the published models "
                                          "use and this loader does not reproduce")
    if args.get("pe_embedding_strategy", "concat") != "concat":
        raise CheckpointMismatchError(f"args.yaml pe_embedding_strategy={args['pe_embedding_strategy']!r}: only "
                                      "'concat' (the published models) is reproduced")


def profile_config(variant: str, args: Mapping[str, object], spec, notes: Optional[List[str]] = None) -> MVFMConfig:
    """:meth:`MVFMConfig.authors` of ``variant`` with what ``args.yaml`` sets (input size, ray width)."""
    return MVFMConfig.authors(variant, **_config_from_args(args, variant, spec, [] if notes is None else notes))


def _config_from_args(args: Mapping[str, object], variant: str, spec, notes: List[str]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    patch = spec.patch_size
    stride = args.get("stride")
    if stride is not None and int(stride) != patch:
        raise CheckpointMismatchError(
            f"args.yaml stride={stride}: overlapping patches (stride != patch size {patch}, e.g. the authors' demo "
            "stride 7) are not supported; the published models were trained and evaluated at stride 14")
    size = args.get("image_size")
    if size is not None:
        hw = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
        if hw[0] % patch or hw[1] % patch:
            raise CheckpointMismatchError(f"args.yaml image_size {list(hw)} is not a multiple of the patch size {patch}")
        out["input_size"] = hw
    else:
        notes.append("no image_size in args.yaml: the published input size is assumed")
    if "plucker_emb_dim" in args and variant != "dinov2_reg_no_plucker":
        out["ray_embed_dim"] = int(args["plucker_emb_dim"])
    return out


def _special_tensors(variant: str, plain: StateDict, origin: Dict[str, str], notes: List[str]
                     ) -> Tuple[Callable[[str], bool], Tuple[str, ...]]:
    """Variant-specific tensors that are not a rename (in place on ``plain``).

    Returns:
        ``(drop, flexible)``: which LoRA targets to drop (e.g. CLIP's unused head), and keys whose shape may
        differ from a fresh timm model (SAM's resized position grid).
    """
    fam = _family(variant)
    if fam == "dinov2":
        # timm's DINOv2 has no CLS position embedding (no_embed_class): fold it into the token
        if "pos_embed" in plain and "cls_token" in plain and plain["pos_embed"].ndim == 3:
            pos = plain["pos_embed"]
            plain["cls_token"] = plain["cls_token"] + pos[:, :1]
            plain["pos_embed"] = pos[:, 1:].contiguous()
        plain.pop("mask_token", None)
        return (lambda name: False), ()
    if fam == "dinov3":
        mask = plain.pop("mask_token", None)
        if mask is not None and not torch.isfinite(mask).all():
            raise CheckpointMismatchError(f"{origin.get('mask_token')} is not finite: their forward adds "
                                          "0 * mask_token to the CLS token, which would be NaN")
        for k in [k for k in plain if k.endswith(".attn.qkv.bias")]:
            bias = plain.pop(k)
            mask_key = k + "_mask"
            m = plain.pop(mask_key, None)
            c = bias.shape[0] // 3
            if m is not None:
                want = torch.ones_like(m)
                want[c:2 * c] = 0
                if not torch.equal(m.float(), want.float()):
                    raise CheckpointMismatchError(f"{origin[mask_key]} is not the k-masking pattern [1, 0, 1] "
                                                  "(timm's DINOv3 fixes k_bias = 0)")
                bias = bias * m
            elif bias[c:2 * c].any():
                raise CheckpointMismatchError(f"{origin[k]} has a non-zero k bias, which timm's DINOv3 cannot hold")
            stem = k[: -len("qkv.bias")]
            plain[stem + "q_bias"], plain[stem + "v_bias"] = bias[:c].contiguous(), bias[2 * c:].contiguous()
            origin[stem + "q_bias"] = origin[stem + "v_bias"] = origin[k]
        return (lambda name: False), ()
    if fam == "clip":
        for k in ("head.weight", "head.bias"):
            plain.pop(k, None)  # their 1000-class head (LoRA-wrapped too) is not part of the features
        return (lambda name: name.startswith("head.")), ()
    return (lambda name: False), ("pos_embed",)
