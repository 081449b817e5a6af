"""A multi-view DPT-style head that reads frozen intermediate ViT features and predicts surface normals.

Design (after the MVFM authors' ``eval_probe3d`` multi-view DPT probe, written anew):

1. **Reduction.** Each layer's tokens are layer-normalised and linearly reduced to ``hidden_dim`` channels
   (the authors attend at the full width; reducing first makes the attention ~(C / hidden_dim)^2 cheaper,
   which is what makes the head CPU-trainable).
2. **Cross-view attention per layer.** The reduced tokens of every view of a set are joined
   (``S * h * w`` tokens) and one pre-norm multi-head self-attention block with a residual runs over
   them, so each view's tokens can read every other view's. With ``view_interaction=False`` the
   attention runs within each view only: the head is then exactly a per-view head (a tested property).
   The reduced tokens and their attended version are concatenated and projected by a 1x1 convolution to
   ``hidden_dim`` channels.
3. **DPT fusion.** Residual convolution units fuse the layers from the deepest to the shallowest
   (``out = RCU(RCU(x_l) + out)``), at the feature grid (the authors fuse at 2x; all ViT layers share one
   grid, so nothing is lost but the cost).
4. **Output.** 2x upsampling -> 3x3 conv -> ReLU -> 2x upsampling -> 3x3 conv to 3 channels (the normal,
   normalised to unit length) plus, with ``uncertainty=True``, one concentration channel
   ``kappa = elu(x) + 1 + KAPPA_MIN`` (a von Mises-Fisher-like confidence, Bae et al. 2021, as Probe3D).

The output grid is ``4x`` the feature grid; callers upsample to the image (:func:`upsample_normals`).
Shapes: features ``[B, S, C_l, h, w]`` per layer -> normals ``[B, S, 3, 4h, 4w]``, kappa ``[B, S, 4h, 4w]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "NormalHeadConfig",
    "MultiViewNormalHead",
    "CrossViewAttention",
    "normal_loss",
    "upsample_normals",
    "KAPPA_MIN",
]

KAPPA_MIN = 0.01
"""Lower bound of the predicted concentration (keeps the uncertainty loss finite)."""


@dataclass
class NormalHeadConfig:
    """Architecture of :class:`MultiViewNormalHead` (stored in head checkpoints)."""

    in_dims: Tuple[int, ...] = (384, 384, 384, 384)
    """Channels of each input feature layer (one entry per layer, shallow to deep)."""
    hidden_dim: int = 64
    """Channels of the fusion stage."""
    num_heads: int = 4
    """Attention heads of the cross-view attention (must divide hidden_dim)."""
    view_interaction: bool = True
    """Cross-view attention over all views of a set; False = attention within each view (a per-view head)."""
    uncertainty: bool = True
    """Predict a concentration kappa per pixel and train with the uncertainty-aware angular loss."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "NormalHeadConfig":
        d = json.loads(text)
        d["in_dims"] = tuple(d["in_dims"])
        return NormalHeadConfig(**d)


class CrossViewAttention(nn.Module):
    """Pre-norm self-attention over the tokens of all views (or of each view), with a residual.

    ``[B, S, C, h, w] -> [B, S, C, h, w]``.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the feature width {dim}")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, across_views: bool = True) -> torch.Tensor:
        b, s, c, h, w = x.shape
        groups, tokens = (b, s * h * w) if across_views else (b * s, h * w)
        seq = x.permute(0, 1, 3, 4, 2).reshape(groups, tokens, c)
        q, k, v = self.qkv(self.norm(seq)).view(groups, tokens, 3, self.num_heads, c // self.num_heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        seq = seq + self.proj(y.transpose(1, 2).reshape(groups, tokens, c))
        return seq.view(b, s, h, w, c).permute(0, 1, 4, 2, 3)


class _ResidualConvUnit(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Fusion(nn.Module):
    """``out = RCU_b(RCU_a(x) + previous)`` (the deepest layer has no previous)."""

    def __init__(self, dim: int, with_skip: bool):
        super().__init__()
        self.skip = _ResidualConvUnit(dim) if with_skip else None
        self.out = _ResidualConvUnit(dim)

    def forward(self, x: torch.Tensor, previous: Optional[torch.Tensor]) -> torch.Tensor:
        if previous is not None:
            x = self.skip(x) + previous
        return self.out(x)


class MultiViewNormalHead(nn.Module):
    """Normal head on frozen features (see the module docstring).

    Call ``head(layers) -> (normals [B, S, 3, 4h, 4w] unit, kappa [B, S, 4h, 4w] or None)`` with ``layers`` a
    list of ``[B, S, C_l, h, w]`` feature maps, one per entry of ``config.in_dims``.
    """

    def __init__(self, config: NormalHeadConfig = NormalHeadConfig()):
        super().__init__()
        if not config.in_dims:
            raise ValueError("NormalHeadConfig.in_dims is empty: the head needs at least one feature layer")
        self.config = config
        d = config.hidden_dim
        self.reduce = nn.ModuleList(nn.Sequential(nn.LayerNorm(c), nn.Linear(c, d)) for c in config.in_dims)
        self.attention = nn.ModuleList(CrossViewAttention(d, config.num_heads) for _ in config.in_dims)
        self.project = nn.ModuleList(nn.Conv2d(2 * d, d, 1) for _ in config.in_dims)
        n = len(config.in_dims)
        self.fusion = nn.ModuleList(_Fusion(d, with_skip=i < n - 1) for i in range(n))
        self.out_conv1 = nn.Conv2d(d, d // 2, 3, padding=1)
        self.out_conv2 = nn.Conv2d(d // 2, 4 if config.uncertainty else 3, 3, padding=1)

    def forward(self, layers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        cfg = self.config
        if len(layers) != len(cfg.in_dims):
            raise ValueError(f"the head reads {len(cfg.in_dims)} feature layers, got {len(layers)}")
        b, s, _, h, w = layers[0].shape
        projected: List[torch.Tensor] = []
        for i, x in enumerate(layers):
            if x.ndim != 5 or x.shape[2] != cfg.in_dims[i] or tuple(x.shape[-2:]) != (h, w):
                raise ValueError(f"feature layer {i} must be [B, S, {cfg.in_dims[i]}, {h}, {w}], got {tuple(x.shape)}")
            x = self.reduce[i](x.float().movedim(2, -1)).movedim(-1, 2)
            y = torch.cat([x, self.attention[i](x, across_views=cfg.view_interaction)], dim=2).flatten(0, 1)
            projected.append(self.project[i](y))
        out = None
        for i in reversed(range(len(projected))):
            out = self.fusion[i](projected[i], out)
        out = F.relu(self.out_conv1(F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=False)))
        out = self.out_conv2(F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=False))
        normals = F.normalize(out[:, :3], dim=1, eps=1e-6).view(b, s, 3, *out.shape[-2:])
        kappa = None
        if cfg.uncertainty:
            kappa = (F.elu(out[:, 3]) + 1 + KAPPA_MIN).view(b, s, *out.shape[-2:])
        return normals, kappa


def normal_loss(normals: torch.Tensor, target: torch.Tensor, kappa: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Angular loss over pixels with a target (NaN targets are skipped).

    Args:
        normals: ``[..., 3, H, W]`` predicted unit normals.
        target: ``[..., 3, H, W]`` unit ground truth, NaN where there is none.
        kappa: ``[..., H, W]`` predicted concentration, or None.

    Returns:
        Without kappa the mean angle in radians; with kappa the uncertainty-aware negative log-likelihood
        ``-log(kappa^2 + 1) + kappa * theta + log(1 + exp(-kappa * pi))`` (Bae et al. 2021; Probe3D's
        ``uncertainty_aware`` loss), averaged over valid pixels.
    """
    valid = torch.isfinite(target).all(-3)
    if not bool(valid.any()):
        raise ValueError("normal_loss: the target has no valid pixel")
    cos = (normals * target.nan_to_num(0.0)).sum(-3)[valid]
    theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
    if kappa is None:
        return theta.mean()
    k = kappa[valid]
    nll = -torch.log(k.square() + 1) + k * theta + torch.log1p(torch.exp(-k * math.pi))
    return nll.mean()


def upsample_normals(normals: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of unit normals ``[..., 3, h, w]`` to ``size`` and renormalisation."""
    lead = normals.shape[:-3]
    x = F.interpolate(normals.reshape(-1, 3, *normals.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return F.normalize(x, dim=1, eps=1e-6).view(*lead, 3, *size)
