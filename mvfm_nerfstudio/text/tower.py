"""CLIP text towers (open_clip) matching the image backbones, and their weights.

A backbone with a text tower (:attr:`~mvfm_nerfstudio.backbones.registry.BackboneSpec.text_tower`, e.g.
``clip_vitb16``: OpenAI CLIP ViT-B/16) gets its text transformer from the same place as its image weights, so
text and image embeddings live in one joint space. ``weights=`` takes the backbone's three values, with the same
meaning and the same errors (:mod:`mvfm_nerfstudio.backbones.vit`):

* ``"pretrained"``: the open_clip checkpoint of the backbone's pretrained tag (for ``clip_vitb16`` the file
  ``open_clip_model.safetensors`` of ``timm/vit_base_patch16_clip_224.openai``, the Hugging Face repo timm reads the
  image tower from), from the Hugging Face cache, else downloaded when the hub is reachable; offline and not cached:
  :class:`~mvfm_nerfstudio.errors.WeightsUnavailableError` within seconds, naming the options;
* a local file: an open_clip CLIP state dict (``.safetensors``, or ``.bin``/``.pt`` read with
  ``torch.load(weights_only=True)``) holding the text tower (``token_embedding.weight``, ``transformer.*``, ...);
  the same file also works as the backbone's ``weights`` (timm converts its ``visual.*`` part);
* ``"random"``: random initialisation under a seed (tests and demos only: embeddings carry no meaning).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones.registry import BackboneSpec, require_text_tower
from ..backbones.vit import _mismatch_report, describe_weights, hub_file
from ..errors import CheckpointMismatchError, WeightsUnavailableError
from ..utils.runtime import DeviceLike, resolve_device

__all__ = ["CLIPTextTower", "create_text_tower", "TINY_TEXT_OVERRIDES", "OPEN_CLIP_FILES"]

TINY_TEXT_OVERRIDES = {"width": 64, "heads": 2, "layers": 2}
"""open_clip text-config overrides of the tiny random test tower (same tokenizer, vocabulary and output width)."""
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""File names of an open_clip checkpoint in a Hugging Face repo, preferred first."""


def _text_weights_options(spec: BackboneSpec) -> str:
    return (
        "Choose one of:\n"
        f"  text weights 'pretrained'  the open_clip checkpoint {spec.text_tower} ({spec.pretrained_tag}) from the "
        "Hugging Face cache or hub (download once on a connected machine, e.g. `python -c \"import open_clip; "
        f"open_clip.create_model('{spec.text_tower}', pretrained='{spec.pretrained_tag}')\"`, then copy "
        "~/.cache/huggingface);\n"
        "  text weights '/path/to/open_clip_model.safetensors'  a local open_clip CLIP state dict with the text tower;\n"
        "  text weights 'random'  random initialisation (tests and demos only: text embeddings are not meaningful)."
    )


def _pretrained_file(spec: BackboneSpec) -> str:
    from open_clip import pretrained

    cfg = pretrained.get_pretrained_cfg(spec.text_tower, spec.pretrained_tag)
    repo = (cfg or {}).get("hf_hub", "").rstrip("/")
    if not repo:
        raise WeightsUnavailableError(
            f"open_clip has no Hugging Face checkpoint for {spec.text_tower} ({spec.pretrained_tag}), the text tower of "
            f"backbone {spec.name!r}.\n" + _text_weights_options(spec))
    return hub_file(repo, list(OPEN_CLIP_FILES), f"the CLIP text tower of backbone {spec.name!r}",
                    _text_weights_options(spec))


def _read_state_dict(path: Path, spec: BackboneSpec) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise WeightsUnavailableError(
            f"text weights file {str(path)!r} for backbone {spec.name!r} does not exist.\n{_text_weights_options(spec)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as err:  # corrupt, a pickle needing code (refused by weights_only), a TorchScript archive
        raise CheckpointMismatchError(
            f"could not read text weights file {str(path)!r} for backbone {spec.name!r}: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(state, dict) or "token_embedding.weight" not in state:
        raise CheckpointMismatchError(
            f"text weights file {str(path)!r} has no CLIP text tower (no 'token_embedding.weight'; an image-only timm "
            f"file?).\n{_text_weights_options(spec)}")
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


class CLIPTextTower(nn.Module):
    """A frozen CLIP text transformer with its tokenizer: phrases -> unit vectors in CLIP's joint space.

    Args:
        spec: the image backbone whose text tower this is.
        transformer: open_clip ``TextTransformer`` (ends with the text projection).
        tokenizer: open_clip tokenizer (``list of str -> [P, context] long``).
        weights: where the weights came from (``describe_weights`` of the option).
        tiny: the tiny random test size.
    """

    def __init__(self, spec: BackboneSpec, transformer: nn.Module, tokenizer, weights: str, tiny: bool = False):
        super().__init__()
        self.spec = spec
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.weights = weights
        self.tiny = tiny
        self.embed_dim = int(transformer.text_projection.shape[-1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "CLIPTextTower":
        return super().train(False)  # frozen

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """``P`` phrases -> ``[P, E]`` float32 unit vectors (on the tower's device)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise ValueError(f"text queries must be non-empty strings, got {list(texts)!r}")
        device = self.transformer.token_embedding.weight.device
        tokens = self.tokenizer(list(texts)).to(device)
        return F.normalize(self.transformer(tokens).float(), dim=-1)


def create_text_tower(backbone: str, weights: str = "pretrained", tiny: bool = False, seed: int = 0,
                      device: Optional[DeviceLike] = None) -> CLIPTextTower:
    """The CLIP text tower of image backbone ``backbone`` (see the module docstring for ``weights``).

    Args:
        backbone: registered backbone name with a text tower (``clip_vitb16``).
        weights: ``"pretrained"``, a local open_clip state-dict file, or ``"random"``.
        tiny: 2-layer, 64-wide text transformer (random weights or a file of that size), for tests.
        seed: torch seed of random weights (the caller's random state is left untouched).
        device: where the tower runs (None: CUDA when available, else the CPU).

    Raises:
        NoTextTowerError: the backbone has no text tower.
        WeightsUnavailableError: pretrained weights not cached and not downloadable, or a missing file.
        CheckpointMismatchError: the file has no text tower, does not fit, or cannot be read.
    """
    spec = require_text_tower(backbone)
    try:
        import open_clip
        from open_clip.model import _build_text_tower
    except ImportError as err:
        raise ImportError(
            "text queries need open_clip, which is not installed. Fix: pip install --no-deps open-clip-torch==3.3.0 "
            "ftfy regex (--no-deps: its timm requirement is handled as in README, 'Installation')") from err
    cfg = open_clip.get_model_config(spec.text_tower)
    text_cfg = dict(cfg["text_cfg"], **(TINY_TEXT_OVERRIDES if tiny else {}))
    state = None
    if not (isinstance(weights, str) and weights == "random"):
        if tiny and isinstance(weights, str) and weights in ("pretrained", "fit3d"):
            raise ValueError("tiny=True builds a test-size text tower that has no pretrained weights; use weights='random'")
        if isinstance(weights, str) and weights in ("pretrained", "fit3d"):
            if weights == "fit3d":
                raise WeightsUnavailableError(f"FiT3D has no text tower for backbone {spec.name!r}.\n"
                                              + _text_weights_options(spec))
            path = Path(_pretrained_file(spec))
        elif isinstance(weights, (str, os.PathLike)):
            path = Path(weights).expanduser()
        else:
            raise TypeError(f"text weights must be 'pretrained', 'random' or a file path, got {type(weights).__name__}")
        state = _read_state_dict(path, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _build_text_tower(cfg["embed_dim"], text_cfg, quick_gelu=bool(cfg.get("quick_gelu", False)))
    if state is not None:
        own = transformer.state_dict()
        report = _mismatch_report(own, state)
        if report:
            raise CheckpointMismatchError(
                f"text weights ({weights}) do not fit the text tower {spec.text_tower} of backbone {spec.name!r}:\n"
                f"  {report}")
        transformer.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    tokenizer = open_clip.get_tokenizer(spec.text_tower)
    tower = CLIPTextTower(spec, transformer, tokenizer, describe_weights(weights), tiny=tiny)
    return tower.to(resolve_device("auto", default=device))
