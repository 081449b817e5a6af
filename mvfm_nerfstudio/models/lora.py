"""Low-rank (LoRA) weight deltas: merged into a backbone once, and taken out again for its base model.

A LoRA factor pair on a weight ``W`` (peft's layout) is ``A [r, in]`` and ``B [out, r]`` for a Linear, or
``A [r, in, kh, kw]`` and ``B [out, r, 1, 1]`` for a Conv2d; the layer computes ``W + scale * delta(A, B)``
with ``scale = alpha / r`` (peft's default, ``use_rslora=False``).
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

__all__ = ["LoRAFactors", "lora_delta", "lora_delta_shape", "merge_lora", "unmerged_weights"]

LoRAFactors = Dict[str, Tuple[torch.Tensor, torch.Tensor]]
"""Parameter name (of the module the factors apply to) -> ``(A, B)``."""


def lora_delta_shape(a: torch.Tensor, b: torch.Tensor) -> Tuple[int, ...]:
    """Shape of the weight the factors ``A``, ``B`` update (without computing the delta)."""
    if a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[1]:
        return (int(b.shape[0]), int(a.shape[1]))
    if a.ndim == 4 and b.ndim == 4 and b.shape[-2:] == (1, 1) and a.shape[0] == b.shape[1]:
        return (int(b.shape[0]), *(int(x) for x in a.shape[1:]))
    raise ValueError(f"LoRA factors of shapes {list(a.shape)} and {list(b.shape)} are neither Linear nor Conv2d ones")


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` in the weight's layout (``[out, in]`` or ``[out, in, kh, kw]``), float32."""
    a, b = a.float(), b.float()
    if a.ndim == 2 and b.ndim == 2:
        return scale * (b @ a)
    if a.ndim == 4 and b.ndim == 4 and b.shape[-2:] == (1, 1):
        return scale * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    raise ValueError(f"LoRA factors of shapes {list(a.shape)} and {list(b.shape)} are neither Linear nor Conv2d ones")


def merge_lora(module: nn.Module, factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    """Add ``scale * B @ A`` to each named parameter of ``module`` in place (float32 arithmetic).

    Raises:
        KeyError / ValueError: a name that is not a parameter, or factors that do not fit its shape.
    """
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            if name not in params:
                raise KeyError(f"LoRA target {name!r} is not a parameter of the backbone")
            p = params[name]
            delta = lora_delta(a, b, scale)
            if delta.shape != p.shape:
                raise ValueError(f"LoRA delta for {name} has shape {list(delta.shape)}, the weight {list(p.shape)}")
            p.copy_((p.float() + delta.to(p.device)).to(p.dtype))


def unmerged_weights(module: nn.Module, factors: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
                     scale: float) -> Dict[str, torch.Tensor]:
    """The LoRA-targeted parameters of ``module`` with their delta taken out (``W' - scale * B @ A``), on their
    devices; equal to the weights before :func:`merge_lora` up to float32 rounding (~1e-7 relative)."""
    params = dict(module.named_parameters())
    out = {}
    with torch.no_grad():
        for name, (a, b) in factors.items():
            p = params[name]
            out[name] = (p.float() - lora_delta(a, b, scale).to(p.device)).to(p.dtype)
    return out
