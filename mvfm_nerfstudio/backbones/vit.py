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
* ``"random"``: random initialisation, for tests and demos only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union
from urllib.parse import urlparse

import torch
import torch.nn as nn

from ..errors import CheckpointMismatchError, WeightsUnavailableError
from .registry import BackboneSpec, get_backbone_spec

__all__ = [
    "FoundationBackbone",
    "TokenContext",
    "ImageSizeError",
    "create_backbone",
    "WeightsSource",
]

logger = logging.getLogger(__name__)

WeightsSource = Union[str, os.PathLike]


class ImageSizeError(ValueError):
    """Image height/width is not a multiple of the backbone's patch size."""


@dataclass
class TokenContext:
    """Per-forward state the blocks need besides the tokens."""

    grid: Tuple[int, int]
    """(h, w) patch grid."""
    rope: Optional[torch.Tensor] = None
    """Rotary position embedding (DINOv3 / Eva family)."""


def _weights_options(spec: BackboneSpec) -> str:
    return (
        "Choose one of:\n"
        f"  weights='pretrained'  timm weights '{spec.timm_pretrained_name}' from the Hugging Face cache or hub "
        "(download once on a connected machine, e.g. `python -c \"import timm; "
        f"timm.create_model('{spec.timm_pretrained_name}', pretrained=True)\"`, then copy ~/.cache/huggingface);\n"
        "  weights='/path/to/weights.safetensors'  a local timm or original-format state dict (.safetensors or .pth);\n"
        "  weights='random'  random initialisation (tests and demos only: features are not meaningful)."
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


def _create_timm_model(spec: BackboneSpec, tiny: bool, **kwargs) -> nn.Module:
    import timm

    overrides = dict(spec.timm_kwargs)
    if tiny:
        overrides.update(spec.tiny_overrides)
    return timm.create_model(spec.timm_pretrained_name, num_classes=0, **overrides, **kwargs)


def _load_from_file(spec: BackboneSpec, path: Path, tiny: bool) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights file {str(path)!r} for backbone {spec.name!r} does not exist.\n{_weights_options(spec)}"
        )
    try:
        return _create_timm_model(spec, tiny, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
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


def _load_pretrained(spec: BackboneSpec, tiny: bool) -> nn.Module:
    if tiny:
        raise ValueError("tiny=True builds a test-size architecture that has no pretrained weights; use weights='random'")
    cached = cached_pretrained_file(spec)
    if cached is not None:
        logger.info("loading %s from the Hugging Face cache: %s", spec.timm_pretrained_name, cached)
        return _load_from_file(spec, Path(cached), tiny=False)
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"pretrained weights for backbone {spec.name!r} ({spec.timm_pretrained_name}) are not in the "
            "Hugging Face cache and the hub is not reachable (offline, or HF_HUB_OFFLINE=1).\n"
            + _weights_options(spec)
        )
    try:
        return _create_timm_model(spec, tiny=False, pretrained=True)
    except Exception as err:
        raise WeightsUnavailableError(
            f"downloading pretrained weights for backbone {spec.name!r} ({spec.timm_pretrained_name}) failed: "
            f"{type(err).__name__}: {err}\n" + _weights_options(spec)
        ) from err


def describe_weights(weights: WeightsSource) -> str:
    """Canonical string for a weights choice (used in checkpoint metadata and cache keys)."""
    if isinstance(weights, str) and weights in ("pretrained", "random"):
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

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: str, tiny: bool = False):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.tiny = tiny
        self.family = spec.family
        self.patch_size = spec.patch_size
        self.embed_dim = int(model.embed_dim)
        self.depth = len(model.blocks)
        self.num_prefix_tokens = 0 if spec.family == "sam" else int(model.num_prefix_tokens)
        self.feature_dim = int(model.num_features) if spec.family == "sam" else self.embed_dim
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
            if m.pos_embed is not None:
                x = x + resample_abs_pos_embed_nhwc(m.pos_embed, x.shape[1:3])
            x = m.norm_pre(m.patch_drop(m.pos_drop(x)))
            return x.flatten(1, 2), TokenContext(grid=grid)
        x = m.patch_embed(images)
        if self.family == "eva":
            x, rope = m._pos_embed(x)
            return m.norm_pre(x), TokenContext(grid=grid, rope=rope)
        x = m._pos_embed(x)
        x = m.norm_pre(m.patch_drop(x))
        return x, TokenContext(grid=grid)

    def run_block(self, index: int, tokens: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """Apply transformer block ``index`` to ``[N, P + h*w, C]`` tokens."""
        blk = self.model.blocks[index]
        if self.family == "sam":
            n, _, c = tokens.shape
            return blk(tokens.view(n, *ctx.grid, c)).flatten(1, 2)
        if self.family == "eva":
            return blk(tokens, rope=ctx.rope)
        return blk(tokens)

    def head(self, tokens: torch.Tensor, ctx: TokenContext) -> torch.Tensor:
        """Final norm (or SAM's neck) -> dense features ``[N, F, h, w]``."""
        n, _, c = tokens.shape
        h, w = ctx.grid
        if self.family == "sam":
            return self.model.neck(tokens.view(n, h, w, c).permute(0, 3, 1, 2))
        x = self.model.norm(tokens)[:, self.num_prefix_tokens:]
        return x.transpose(1, 2).reshape(n, c, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Base-model dense features: ``[N, 3, H, W]`` in [0, 1] -> ``[N, F, H/p, W/p]``."""
        tokens, ctx = self.embed(self.normalize(images))
        for i in range(self.depth):
            tokens = self.run_block(i, tokens, ctx)
        return self.head(tokens, ctx)


def create_backbone(name: str, weights: WeightsSource = "pretrained", tiny: bool = False) -> FoundationBackbone:
    """Build a registered backbone with the requested weights.

    Args:
        name: registry name (see :func:`mvfm_nerfstudio.list_backbones`).
        weights: ``"pretrained"``, a local weights file, or ``"random"``.
        tiny: build a 2-block, 64-wide instance of the same architecture (random weights
            only), for tests and CPU demos.

    Raises:
        UnknownBackboneError: unknown name.
        WeightsUnavailableError: weights cannot be obtained; the message names all options.
        CheckpointMismatchError: the weights file belongs to another architecture or is corrupt.
    """
    spec = get_backbone_spec(name)
    if isinstance(weights, str) and weights == "random":
        model = _create_timm_model(spec, tiny, pretrained=False)
    elif isinstance(weights, str) and weights == "pretrained":
        model = _load_pretrained(spec, tiny)
    elif isinstance(weights, (str, os.PathLike)):
        model = _load_from_file(spec, Path(weights).expanduser(), tiny)
    else:
        raise TypeError(f"weights must be 'pretrained', 'random' or a file path, got {type(weights).__name__}")
    return FoundationBackbone(spec, model, describe_weights(weights), tiny=tiny)
