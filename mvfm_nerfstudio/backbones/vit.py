"""Uniform block-by-block access to timm Vision Transformers, and their weights.

:class:`FoundationBackbone` exposes every registered backbone through the same three
steps, so the MVFM can insert adapters between blocks without knowing the family::

    tokens, ctx = backbone.embed(images)        # [N, P + h*w, C]
    for i in range(backbone.depth):
        tokens = backbone.run_block(i, tokens, ctx)
    features = backbone.head(tokens, ctx)       # [N, F, h, w]

Weights (``weights=``) are one of:

* ``"pretrained"``: timm's pretrained weights, from the Hugging Face cache if present,
  otherwise downloaded from the hub (fails fast with a clear error when offline);
* a path to a local ``.safetensors`` / ``.pth`` file (timm or original-format state dict);
* ``"fit3d"``: the FiT3D fine-tuned backbone of this architecture (Yue et al., Hugging Face repo
  ``yuanwenyue/FiT3D``, plain timm state dicts), from the Hugging Face cache or the hub;
* ``"random"``: random initialisation, for tests and demos only.

:func:`backbone_from_state_dict` builds a backbone from tensors already in memory (a converted
published checkpoint carries its own fine-tuned backbone).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointMismatchError, WeightsUnavailableError
from .registry import BackboneSpec, get_backbone_spec, require_text_tower

__all__ = [
    "FoundationBackbone",
    "TokenContext",
    "ImageSizeError",
    "weights_options",
    "create_backbone",
    "backbone_from_state_dict",
    "hub_file",
    "FIT3D_REPO",
    "FIT3D_FILES",
    "POS_EMBED_MODES",
    "WeightsSource",
]

logger = logging.getLogger(__name__)

WeightsSource = Union[str, os.PathLike]

FIT3D_REPO = "yuanwenyue/FiT3D"
"""Hugging Face repo of the FiT3D fine-tuned backbones (the MVFM paper's baseline)."""
FIT3D_FILES = {
    "dinov2_vits14": "dinov2_small_finetuned.pth",
    "dinov2_vitb14": "dinov2_base_finetuned.pth",
    "dinov2_vits14_reg": "dinov2_reg_small_finetuned.pth",
    "clip_vitb16_laion": "clip_base_finetuned.pth",
}
"""Registered backbone -> FiT3D file (plain timm state dicts of exactly these timm architectures)."""

POS_EMBED_MODES = ("timm", "dinov2_hub", "bilinear")
"""How absolute position embeddings are resampled to the patch grid: ``timm`` (timm's own: bicubic with
antialiasing), ``dinov2_hub`` (the DINOv2 torch.hub code the MVFM authors used: bicubic at scale
``(n + 0.1) / N``, no antialiasing, skipped at the stored grid), ``bilinear`` (the authors' SAM: bilinear,
no antialiasing)."""


class ImageSizeError(ValueError):
    """Image height/width is not a multiple of the backbone's patch size."""


@dataclass
class TokenContext:
    """Per-forward state the blocks need besides the tokens."""

    grid: Tuple[int, int]
    """(h, w) patch grid."""
    rope: Optional[torch.Tensor] = None
    """Rotary position embedding (DINOv3 / Eva family)."""


def weights_options(spec: BackboneSpec) -> str:
    """The weight choices for ``spec`` (pretrained, a local file, FiT3D where published, random), for error messages."""
    return (
        "Choose one of:\n"
        f"  weights='pretrained'  timm weights '{spec.timm_pretrained_name}' from the Hugging Face cache or hub "
        "(download once on a connected machine, e.g. `python -c \"import timm; "
        f"timm.create_model('{spec.timm_pretrained_name}', pretrained=True)\"`, then copy ~/.cache/huggingface);\n"
        "  weights='/path/to/weights.safetensors'  a local timm or original-format state dict (.safetensors or .pth);\n"
        + (f"  weights='fit3d'  the FiT3D fine-tuned backbone ({FIT3D_REPO}/{FIT3D_FILES[spec.name]});\n"
           if spec.name in FIT3D_FILES else "")
        + "  weights='random'  random initialisation (tests and demos only: features are not meaningful)."
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap connectivity probe, so offline users get an error in seconds, not after a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    parsed = urlparse(constants.ENDPOINT)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_file(repo_id: str, filenames: Sequence[str], what: str, options: str) -> str:
    """Local path of the first of ``filenames`` in Hugging Face repo ``repo_id``: from the Hugging Face cache,
    else downloaded when the hub is reachable.

    Args:
        repo_id: e.g. ``"Leoseg/dinov2_reg"``.
        filenames: candidate paths inside the repo, tried in order.
        what: what the file is, for error messages.
        options: the alternatives the error messages list.

    Raises:
        WeightsUnavailableError: not cached and offline (within seconds), not in the repo, or the download failed.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"{what} ({repo_id}: {' or '.join(filenames)}) is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the hub is not reachable (offline, or HF_HUB_OFFLINE=1).\n{options}"
        )
    from huggingface_hub.utils import EntryNotFoundError

    for filename in filenames:
        try:
            return hf_hub_download(repo_id, filename, cache_dir=constants.HF_HUB_CACHE)
        except EntryNotFoundError:
            continue
        except Exception as err:
            raise WeightsUnavailableError(
                f"downloading {what} ({repo_id}/{filename}) failed: {type(err).__name__}: {err}\n{options}"
            ) from err
    raise WeightsUnavailableError(f"the Hugging Face repo {repo_id} has none of {list(filenames)} ({what}).\n{options}")


def _fit3d_file(spec: BackboneSpec) -> str:
    if spec.name not in FIT3D_FILES:
        raise WeightsUnavailableError(
            f"FiT3D has no fine-tuned backbone for {spec.name!r}; it has: {', '.join(sorted(FIT3D_FILES))}.\n"
            + weights_options(spec)
        )
    return hub_file(FIT3D_REPO, [FIT3D_FILES[spec.name]], f"FiT3D weights for backbone {spec.name!r}",
                    weights_options(spec) + "\nOr copy the Hugging Face cache (~/.cache/huggingface) from a "
                    "connected machine where the file was downloaded.")


def cached_fit3d_file(spec: BackboneSpec) -> Optional[str]:
    """Path of the backbone's FiT3D weights in the Hugging Face cache, or None (no network)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if spec.name not in FIT3D_FILES:
        return None
    path = try_to_load_from_cache(FIT3D_REPO, FIT3D_FILES[spec.name], cache_dir=constants.HF_HUB_CACHE)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def cached_pretrained_file(spec: BackboneSpec) -> Optional[str]:
    """Path of the backbone's pretrained weights in the Hugging Face cache, or None."""
    import timm
    from huggingface_hub import constants, try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(spec.timm_pretrained_name)
    if cfg is None or not cfg.hf_hub_id:
        return None
    repo_id = cfg.hf_hub_id
    candidates = ["model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"]
    if cfg.hf_hub_filename:
        candidates.insert(0, cfg.hf_hub_filename)
    for filename in candidates:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _create_timm_model(spec: BackboneSpec, tiny: bool, text_space: bool = False, **kwargs) -> nn.Module:
    import timm

    overrides = dict(spec.timm_kwargs)
    if tiny:
        overrides.update(spec.tiny_overrides)
    if not text_space:  # the classifier/projection head is dropped; text space keeps CLIP's image projection
        overrides["num_classes"] = 0
    return timm.create_model(spec.timm_pretrained_name, **overrides, **kwargs)


def _load_from_file(spec: BackboneSpec, path: Path, tiny: bool, text_space: bool = False) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {str(path)!r} for backbone {spec.name!r} does not exist.\n{weights_options(spec)}"
        )
    try:
        return _create_timm_model(spec, tiny, text_space, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    except RuntimeError as err:
        # timm's strict load_state_dict lists missing/unexpected keys and size mismatches.
        summary = str(err).strip().splitlines()
        detail = "\n".join(summary[:6]) + ("\n..." if len(summary) > 6 else "")
        raise CheckpointMismatchError(
            f"weights file {str(path)!r} does not fit backbone {spec.name!r} ({spec.timm_name}"
            f"{', tiny test size' if tiny else ''}); is it a checkpoint of another model?\n{detail}"
        ) from err
    except Exception as err:  # corrupt / unreadable files: safetensors, pickle or zip errors
        raise CheckpointMismatchError(
            f"could not read weights file {str(path)!r} for backbone {spec.name!r}: {type(err).__name__}: {err}"
        ) from err


def _load_pretrained(spec: BackboneSpec, tiny: bool, text_space: bool = False) -> nn.Module:
    if tiny:
        raise ValueError("tiny=True builds a test-size architecture that has no pretrained weights; use weights='random'")
    cached = cached_pretrained_file(spec)
    if cached is not None:
        logger.info("loading %s from the Hugging Face cache: %s", spec.timm_pretrained_name, cached)
        return _load_from_file(spec, Path(cached), tiny=False, text_space=text_space)
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"pretrained weights for backbone {spec.name!r} ({spec.timm_pretrained_name}) are not in the "
            "Hugging Face cache and the hub is not reachable (offline, or HF_HUB_OFFLINE=1).\n"
            + weights_options(spec)
        )
    try:
        return _create_timm_model(spec, tiny=False, text_space=text_space, pretrained=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"downloading pretrained weights for backbone {spec.name!r} ({spec.timm_pretrained_name}) failed: "
            f"{type(err).__name__}: {err}\n" + weights_options(spec)
        ) from err


def describe_weights(weights: WeightsSource) -> str:
    """Canonical string for a weights choice (used in checkpoint metadata and cache keys)."""
    if isinstance(weights, str) and weights in ("pretrained", "random", "fit3d"):
        return weights
    return str(Path(weights).expanduser().resolve())


class FoundationBackbone(nn.Module):
    """A frozen timm ViT with block-by-block access and image normalisation.

    Args:
        spec: registry entry.
        model: the timm model (``num_classes=0``).
        weights: description of where the weights came from.
        tiny: whether this is the tiny test-size architecture.
    """

    pos_embed_resample: str = "timm"
    """How absolute position embeddings are resampled (:data:`POS_EMBED_MODES`); see :meth:`set_token_options`."""
    final_norm: bool = True
    """Whether :meth:`head` applies the final LayerNorm (SAM always uses its neck)."""

    text_space: bool = False
    """Dense features in CLIP's joint image-text space (see :meth:`head`); set by ``create_backbone(text_space=True)``."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: str, tiny: bool = False,
                 text_space: bool = False):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.tiny = tiny
        if text_space:
            head = getattr(model, "head", None)
            if spec.text_tower is None or spec.family != "vit" or not isinstance(head, nn.Linear):
                require_text_tower(spec.name)  # raises NoTextTowerError naming the backbones that have one
                raise ValueError(f"text_space needs the timm model of {spec.name!r} built with its projection head")
            self.text_space = True
        self.family = spec.family
        self.patch_size = spec.patch_size
        self.embed_dim = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.num_prefix_tokens = 0 if spec.family == "sam" else int(model.num_prefix_tokens)
        # timm puts register tokens last among the prefix tokens ([CLS, registers..., patches])
        reg = getattr(model, "reg_token", None)
        self.num_register_tokens = 0 if reg is None or spec.family == "sam" else int(reg.shape[1])
        self.feature_dim = int(model.num_features) if spec.family == "sam" else self.embed_dim
        if self.text_space:
            self.feature_dim = int(model.head.out_features)  # CLIP's joint embedding width (512 for ViT-B/16)
        if spec.family == "eva" and getattr(model, "rope_mixed", False):
            raise NotImplementedError(f"{spec.timm_name}: depth-dependent (mixed) RoPE is not supported")
        self.register_buffer("mean", torch.tensor(spec.mean).view(3, 1, 1), persistent=False)  # device: buffer
        self.register_buffer("std", torch.tensor(spec.std).view(3, 1, 1), persistent=False)  # device: buffer
        self.requires_grad_(False)
        self.eval()
        self._fingerprint: Optional[str] = None
        self.register_load_state_dict_post_hook(lambda module, _keys: setattr(module, "_fingerprint", None))

    def fingerprint(self) -> str:
        """Short content hash of the weights (names, shapes and values), computed once: the backbone is frozen
        (loading a state dict into it recomputes it)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=12)
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def set_token_options(self, pos_embed_resample: str = "timm", final_norm: bool = True) -> "FoundationBackbone":
        """Choose how tokens are embedded and read out (an MVFM architecture profile sets these).

        Args:
            pos_embed_resample: one of :data:`POS_EMBED_MODES`; ``dinov2_hub`` needs a timm ViT whose position
                embedding excludes the prefix tokens (DINOv2), ``bilinear`` the SAM family.
            final_norm: apply the final LayerNorm in :meth:`head` (ignored for SAM, whose neck always runs).
        """
        if pos_embed_resample not in POS_EMBED_MODES:
            raise ValueError(f"pos_embed_resample must be one of {POS_EMBED_MODES}, got {pos_embed_resample!r}")
        wants = {"dinov2_hub": "vit", "bilinear": "sam"}.get(pos_embed_resample)
        if wants is not None and (self.family != wants or getattr(self.model, "pos_embed", None) is None
                                  or (wants == "vit" and not getattr(self.model, "no_embed_class", False))):
            raise ValueError(f"pos_embed_resample={pos_embed_resample!r} does not apply to backbone {self.spec.name!r}")
        self.pos_embed_resample = pos_embed_resample
        self.final_norm = bool(final_norm)
        return self

    def train(self, mode: bool = True) -> "FoundationBackbone":
        # The backbone is frozen: keep it in eval mode so no dropout / drop-path ever applies.
        return super().train(False)

    def check_image_size(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid (h, w) for an image size; raises :class:`ImageSizeError` if not divisible."""
        p = self.patch_size
        if height % p or width % p or height <= 0 or width <= 0:
            def near(x: int) -> str:
                lo = max(p, x // p * p)
                return f"{lo} or {lo + p}" if x % p else str(x)

            raise ImageSizeError(
                f"image size {height}x{width} (HxW) is not a multiple of the patch size {p} of backbone "
                f"{self.spec.name!r}; resize to e.g. {near(height)} x {near(width)}"
            )
        return height // p, width // p

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] -> normalised with the backbone's mean/std."""
        return (images - self.mean) / self.std

    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, TokenContext]:
        """Patchify normalised images ``[N, 3, H, W]`` -> tokens ``[N, P + h*w, C]`` and context."""
        grid = self.check_image_size(images.shape[-2], images.shape[-1])
        m = self.model
        if self.family == "sam":
            from timm.layers import resample_abs_pos_embed_nhwc

            x = m.patch_embed(images)  # [N, h, w, C]
            if m.pos_embed is not None and self.pos_embed_resample == "bilinear":
                x = x + _resample_bilinear_nhwc(m.pos_embed, x.shape[1:3])
            elif m.pos_embed is not None:
                x = x + resample_abs_pos_embed_nhwc(m.pos_embed, x.shape[1:3])
            x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
            return x.flatten(1, 2), TokenContext(grid=grid)
        x = m.patch_embed(images)
        if self.family == "eva":
            x, rope = m._pos_embed(x)
            return m.norm_pre(x), TokenContext(grid=grid, rope=rope)
        x = self._pos_embed_dinov2_hub(x) if self.pos_embed_resample == "dinov2_hub" else m._pos_embed(x)
        x = m.norm_pre(m.patch_drop(x))
        return x, TokenContext(grid=grid)

    def _pos_embed_dinov2_hub(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``_pos_embed`` for DINOv2 (``[N, h, w, C]`` patches -> ``[N, P + h*w, C]``) with the position grid
        resampled as DINOv2's torch.hub code (the CLS position is already folded into ``cls_token``)."""
        m = self.model
        n, h, w, c = x.shape
        pos = m.pos_embed  # [1, M*M, C], no prefix entries (no_embed_class)
        side = int(round(pos.shape[1] ** 0.5))
        if (h, w) != (side, side):
            grid = pos.reshape(1, side, side, c).permute(0, 3, 1, 2).float()
            # scale_factor (not size): the source coordinates use the +0.1 offset, as the hub code does
            grid = F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic",
                                 align_corners=False, recompute_scale_factor=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, c).to(pos.dtype)
        x = x.reshape(n, h * w, c) + pos
        prefix = [t.expand(n, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        return m.pos_drop(torch.cat(prefix + [x], dim=1) if prefix else x)

    def run_block(self, index: int, tokens: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """Apply transformer block ``index`` to ``[N, P + h*w, C]`` tokens (with :attr:`text_space`, the last block
        runs its value path, :meth:`value_path_block`)."""
        blk = self.model.blocks[index]
        if self.text_space and index == self.depth - 1:
            return self.value_path_block(blk, tokens)
        if self.family == "sam":
            n, _, c = tokens.shape
            return blk(tokens.view(n, *ctx.grid, c)).flatten(1, 2)
        if self.family == "eva":
            return blk(tokens, rope=ctx.rope)
        return blk(tokens)

    @staticmethod
    def value_path_block(blk: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """A timm ViT block with its query-key attention skipped (MaskCLIP): every token attends only to itself,
        so the attention is the value projection followed by the output projection; the residual connections and
        the MLP stay. ``[N, T, C] -> [N, T, C]``.

        ``x + ls1(proj(norm(v(norm1(x)))))``, then ``y + ls2(mlp(norm2(y)))``, with timm's names.
        """
        attn = blk.attn
        if getattr(attn, "gate", None) is not None or not hasattr(attn, "qkv"):
            raise NotImplementedError(f"the value path needs a plain timm Attention, got {type(attn).__name__}")
        c = tokens.shape[-1]
        # rows [2C, 3C) of the fused qkv projection are the value projection
        v = F.linear(blk.norm1(tokens), attn.qkv.weight[2 * c:], None if attn.qkv.bias is None else attn.qkv.bias[2 * c:])
        x = tokens + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(attn.norm(v)))))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def head(self, tokens: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """Final norm (or SAM's neck) -> dense features ``[N, F, h, w]``; with :attr:`text_space` also CLIP's image
        projection of every patch token (``F`` = the joint embedding width), as CLIP projects its CLS token."""
        n, _, c = tokens.shape
        h, w = ctx.grid
        if self.family == "sam":
            return self.model.neck(tokens.view(n, h, w, c).permute(0, 3, 1, 2))
        x = (self.model.norm(tokens) if self.final_norm else tokens)[:, self.num_prefix_tokens:]
        if self.text_space:
            x = self.model.head(x)
            c = x.shape[-1]
        return x.transpose(1, 2).reshape(n, c, h, w)

    def layer_features(self, tokens: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """Patch tokens after some block as a map ``[N, C, h, w]`` (C = embed width), a copy: with the final
        LayerNorm for ViTs (DPT probes read normalised intermediate tokens), raw for SAM (no such norm)."""
        n, _, c = tokens.shape
        h, w = ctx.grid
        x = tokens if self.family == "sam" else self.model.norm(tokens)[:, self.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(n, c, h, w).clone()

    def forward(self, images: torch.Tensor, return_layers: Optional[Sequence[int]] = None):
        """Base-model dense features: ``[N, 3, H, W]`` in [0, 1] -> ``[N, F, H/p, W/p]``.

        With ``return_layers`` (block indices, negative from the end), returns ``(features, layers)`` where
        ``layers[k]`` is :meth:`layer_features` after block ``return_layers[k]``.
        """
        want = self.layer_indices(return_layers)
        tokens, ctx = self.embed(self.normalize(images))
        layers = {}
        for i in range(self.depth):
            tokens = self.run_block(i, tokens, ctx)
            if i in want:
                layers[i] = self.layer_features(tokens, ctx)
        feats = self.head(tokens, ctx)
        return feats if return_layers is None else (feats, [layers[i] for i in want])

    def layer_indices(self, layers: Optional[Sequence[int]]) -> List[int]:
        """Block indices ``layers`` (negative = from the end) as non-negative ints; [] for None; named error if
        out of range."""
        out = []
        for b in layers or ():
            if not -self.depth <= int(b) < self.depth:
                raise ValueError(f"layer index {b} is out of range for {self.spec.name} with {self.depth} blocks")
            out.append(int(b) % self.depth)
        return out


def _resample_bilinear_nhwc(pos: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """``[1, H0, W0, C]`` position grid -> ``[1, h, w, C]``, bilinear without antialiasing (the authors' SAM)."""
    if tuple(pos.shape[1:3]) == tuple(grid):
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


def _mismatch_report(own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], limit: int = 8) -> str:
    """Missing / unexpected / wrong-shape keys of ``given`` against ``own``, with shapes (empty when they fit)."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    wrong = [k for k in own if k in given and tuple(given[k].shape) != tuple(own[k].shape)]
    lines = []
    for title, keys, fmt in (
        ("missing", missing, lambda k: f"{k} {list(own[k].shape)}"),
        ("unexpected", unexpected, lambda k: f"{k} {list(given[k].shape)}"),
        ("wrong shape", wrong, lambda k: f"{k}: given {list(given[k].shape)}, expected {list(own[k].shape)}"),
    ):
        if keys:
            shown = ", ".join(fmt(k) for k in keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
            lines.append(f"{title}: {shown}")
    return "\n  ".join(lines)


def backbone_from_state_dict(
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    tiny: bool = False,
    weights: str = "checkpoint",
    timm_kwargs: Optional[Dict[str, object]] = None,
) -> FoundationBackbone:
    """Build a registered backbone from timm-named tensors (strictly: every key, every shape).

    Two tensors may differ from a fresh timm model and replace its own: SAM's absolute position grid
    ``pos_embed [1, H0, W0, C]`` (the authors' SAM stores the 32x32 grid it was resized to), and the RoPE
    ``rope.periods`` of DINOv3 (timm recomputes them in float32; the released models carry bf16-rounded ones),
    which then becomes a persistent buffer so it is saved with the backbone.

    Args:
        name: registry name.
        state_dict: timm names (as ``FoundationBackbone.model.state_dict()``), float tensors.
        tiny: the state dict is of the tiny test-size architecture.
        weights: description stored in :attr:`FoundationBackbone.weights`.
        timm_kwargs: extra timm constructor arguments (e.g. SAM's LayerNorm eps).

    Raises:
        CheckpointMismatchError: naming the missing, unexpected and wrong-shape keys.
    """
    spec = get_backbone_spec(name)
    # Built on the meta device (no random initialisation: every tensor is given), then materialised.
    with torch.device("meta"):
        model = _create_timm_model(spec, tiny, pretrained=False, **(timm_kwargs or {}))
    given = {k: v for k, v in state_dict.items()}
    pos = given.get("pos_embed")
    if spec.family == "sam" and pos is not None and pos.ndim == 4 and model.pos_embed is not None \
            and pos.shape[-1] == model.pos_embed.shape[-1] and pos.shape != model.pos_embed.shape:
        model.pos_embed = nn.Parameter(torch.zeros(pos.shape, dtype=model.pos_embed.dtype, device="meta"))
    rope = getattr(model, "rope", None)
    if "rope.periods" in given and rope is not None and hasattr(rope, "periods"):
        rope.register_buffer("periods", torch.zeros_like(rope.periods), persistent=True)
    own = model.state_dict()
    report = _mismatch_report(own, given)
    if report:
        raise CheckpointMismatchError(
            f"backbone tensors ({weights}) do not fit backbone {name!r} ({spec.timm_name}"
            f"{', tiny test size' if tiny else ''}):\n  {report}"
        )
    transient = [n for n, _ in model.named_buffers() if n not in own]  # buffers the state dict does not carry
    if all(n.endswith(".k_bias") for n in transient):  # DINOv3's fixed zero k bias: the only kind known here
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for n in transient:
                model.get_buffer(n).zero_()
    else:  # unknown derived buffers: let timm initialise them for real
        model = _create_timm_model(spec, tiny, pretrained=False, **(timm_kwargs or {}))
        if pos is not None and spec.family == "sam" and pos.shape != model.pos_embed.shape:
            model.pos_embed = nn.Parameter(torch.zeros(pos.shape, dtype=model.pos_embed.dtype))  # device: a CPU build
        if "rope.periods" in given and getattr(model, "rope", None) is not None:
            model.rope.register_buffer("periods", torch.zeros_like(model.rope.periods), persistent=True)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in given.items()}, strict=True)
    return FoundationBackbone(spec, model, weights, tiny=tiny)


def create_backbone(name: str, weights: WeightsSource = "pretrained", tiny: bool = False,
                    text_space: bool = False) -> FoundationBackbone:
    """Build a registered backbone with the requested weights.

    Args:
        name: registry name (see :func:`mvfm_nerfstudio.list_backbones`).
        weights: ``"pretrained"``, a local weights file, ``"fit3d"`` (the FiT3D fine-tuned backbone, for the
            backbones in :data:`FIT3D_FILES`), or ``"random"``.
        tiny: build a 2-block, 64-wide instance of the same architecture (random weights
            only), for tests and CPU demos.
        text_space: dense features in CLIP's joint image-text space: the last block runs its value path (MaskCLIP)
            and CLIP's image projection maps every patch token (:meth:`FoundationBackbone.head`); only backbones
            with a text tower (:func:`~.registry.text_backbones`).

    Raises:
        NoTextTowerError: ``text_space=True`` for a backbone without a CLIP text tower.
        UnknownBackboneError: unknown name.
        WeightsUnavailableError: weights cannot be obtained; the message names all options.
        CheckpointMismatchError: the weights file belongs to another architecture or is corrupt.
    """
    spec = get_backbone_spec(name)
    if text_space:
        require_text_tower(name)
    if isinstance(weights, str) and weights == "random":
        model = _create_timm_model(spec, tiny, text_space, pretrained=False)
    elif isinstance(weights, str) and weights == "pretrained":
        model = _load_pretrained(spec, tiny, text_space)
    elif isinstance(weights, str) and weights == "fit3d":
        if tiny:
            raise ValueError("tiny=True builds a test-size architecture that has no FiT3D weights; use weights='random'")
        model = _load_from_file(spec, Path(_fit3d_file(spec)), tiny=False, text_space=text_space)
    elif isinstance(weights, (str, os.PathLike)):
        model = _load_from_file(spec, Path(weights).expanduser(), tiny, text_space)
    else:
        raise TypeError(f"weights must be 'pretrained', 'random' or a file path, got {type(weights).__name__}")
    return FoundationBackbone(spec, model, describe_weights(weights), tiny=tiny, text_space=text_space)
