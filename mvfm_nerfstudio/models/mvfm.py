"""Multi-view foundation model: a frozen ViT with cross-view MV-Adapters after its blocks.

Shapes: ``B`` sets of ``S`` views, images ``H x W``, patch size ``p``, patch grid
``h = H/p``, ``w = W/p``, ``T = h*w`` patch tokens per view, ``C`` token width,
``F`` output feature width.

Reference frame: the Plücker rays that condition the adapters are computed in a
canonical frame from :func:`~mvfm_nerfstudio.geometry.cameras.normalize_cameras`.
With ``reference_frame="mean"`` (default) its axes are the mean rotation of all views,
so the output does not depend on which view comes first: permuting the input views
permutes the output features and nothing else. ``reference_frame="first"`` uses view
0's axes as the paper does. Either way the output is invariant to any global rigid
motion and scaling of all cameras.

The MVFM authors' released models run on the same class with the architecture profile
:meth:`~mvfm_nerfstudio.models.config.MVFMConfig.authors` (:class:`AuthorsAdapter`, their camera frame,
their token conventions); their LoRA is merged into the backbone (:attr:`MultiViewFoundationModel.backbone_lora`).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backbones.vit import FoundationBackbone
from ..geometry.cameras import (
    CameraError,
    normalize_cameras,
    plucker_ray_map,
    select_neighbor_views,
    to_homogeneous,
    validate_cam_to_world,
    validate_intrinsics,
)
from .attention import CrossViewAttention
from .checkpoint import load_adapters, save_adapters
from .config import MVFMConfig
from .lora import LoRAFactors, unmerged_weights

__all__ = ["AuthorsAdapter", "MVAdapter", "MultiViewFoundationModel"]


class _Adapter(nn.Module):
    """What every adapter offers: ``forward(x, ...) = x + residual(x, ...)`` with ``x [B, S, T, C]``."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``x [B, S, T, C]`` -> ``[B, S, T, C]``; arguments as ``residual``."""
        return x + self.residual(x, *args, **kwargs)

    @staticmethod
    def _zero_projection(width: int, dim: int) -> nn.Linear:
        """The output projection ``width -> dim``, zero-initialised: a fresh adapter adds nothing."""
        proj = nn.Linear(width, dim)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        return proj
class MVAdapter(_Adapter):
    """One MV-Adapter: cross-view attention + MLP, added residually through a zero-initialised projection.

    ``x -> x + out_proj(mlp_block(attn_block(in_proj([LN(x), extra]))))`` where the
    attention and MLP blocks are pre-norm residual blocks of width ``adapter_dim``.
    Because ``out_proj`` starts at zero, a fresh adapter is the identity.

    Args:
        dim: backbone token width C.
        adapter_dim: internal width D.
        num_heads, mlp_ratio: attention heads and MLP expansion.
        extra_dim: channels concatenated to the normalised input (ray embedding), 0 for none.
    """

    def __init__(self, dim: int, adapter_dim: int, num_heads: int, mlp_ratio: float, extra_dim: int = 0):
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        needs_proj = extra_dim > 0 or adapter_dim != dim
        self.in_proj = nn.Linear(dim + extra_dim, adapter_dim) if needs_proj else nn.Identity()
        self.norm_attn = nn.LayerNorm(adapter_dim)
        self.attn = CrossViewAttention(adapter_dim, num_heads)
        self.norm_mlp = nn.LayerNorm(adapter_dim)
        hidden = int(adapter_dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(adapter_dim, hidden), nn.GELU(), nn.Linear(hidden, adapter_dim)) \
            if hidden > 0 else None
        self.out_proj = self._zero_projection(adapter_dim, dim)

    def residual(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        extra: Optional[torch.Tensor] = None,
        neighbors: Optional[torch.Tensor] = None,
        kv_pool: int = 1,
    ) -> torch.Tensor:
        """The correction :meth:`forward` adds to ``x``: ``[B, S, T, C]`` (the MVFM adds it in place when no
        gradient is needed). ``extra`` is concatenated after the input norm; ``neighbors``/``kv_pool`` select the
        attention (:class:`~mvfm_nerfstudio.models.attention.CrossViewAttention`)."""
        h = self.norm_in(x)
        if extra is not None:
            h = torch.cat([h, extra.to(h.dtype)], dim=-1)
        h = self.in_proj(h)
        h = h + self.attn(self.norm_attn(h), grid, neighbors, kv_pool)
        if self.mlp is not None:
            h = h + self.mlp(self.norm_mlp(h))
        return self.out_proj(h)


class AuthorsAdapter(_Adapter):
    """The MV-Adapter of the MVFM authors' released models (``adapter_type="authors"``).

    ``delta = out_proj(up(mlp(attn(LN(down([x, extra]))))))``, with no inner residual (their
    ``fix_res_bug=True``): LayerNorm (eps 1e-5) over the input and, at the first adapter, the concatenated ray
    embedding (register tokens get zeros there); cross-view attention at that width (``num_heads`` heads);
    an optional GELU MLP; the zero-initialised per-token projection back to the backbone width (their
    ``zero_conv``, a 1x1 Conv1d). With ``pool > 1`` the patch grid is max-pooled before the attention and
    upsampled bilinearly (``align_corners=True``) before the projection (their ``spatial_reduction``).

    Args:
        dim: backbone token width C.
        num_heads: attention heads (the width ``C + extra_dim`` must be divisible by it).
        mlp_ratio: MLP hidden width relative to the input width; 0 = no MLP.
        extra_dim: ray-embedding channels concatenated at this adapter (0 for none).
        pool: max-pooling factor of the patch grid (1 = none).
        num_registers: leading register tokens in the adapted tokens (they attend and are corrected, never pooled).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, extra_dim: int = 0, pool: int = 1,
                 num_registers: int = 0):
        super().__init__()
        width = dim + extra_dim
        self.extra_dim, self.pool, self.num_registers = extra_dim, pool, num_registers
        self.norm = nn.LayerNorm(width)
        self.attn = CrossViewAttention(width, num_heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) if hidden > 0 else None
        self.out_proj = self._zero_projection(width, dim)

    def residual(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        extra: Optional[torch.Tensor] = None,
        neighbors: Optional[torch.Tensor] = None,
        kv_pool: int = 1,
    ) -> torch.Tensor:
        """The correction of ``x [B, S, R + T, C]`` (R registers, then the ``T = h*w`` patch tokens); ``extra``
        ``[B, S, T, E]`` is the ray embedding (first adapter only); ``neighbors``/``kv_pool`` select the attention."""
        b, s, n, _ = x.shape
        r, (h, w) = self.num_registers, grid
        if extra is not None:
            extra = extra.to(x.dtype)
            if r:
                extra = torch.cat([extra.new_zeros(b, s, r, extra.shape[-1]), extra], dim=2)
            x = torch.cat([x, extra], dim=-1)
        attn_grid = grid
        if self.pool > 1:  # pooled before the norm, as theirs
            patches = x[:, :, r:].reshape(b * s, h, w, -1).permute(0, 3, 1, 2)
            patches = F.max_pool2d(patches, self.pool)
            attn_grid = (patches.shape[-2], patches.shape[-1])
            patches = patches.flatten(2).transpose(1, 2).reshape(b, s, attn_grid[0] * attn_grid[1], -1)
            x = torch.cat([x[:, :, :r], patches], dim=2) if r else patches
        y = self.attn(self.norm(x), attn_grid, neighbors, kv_pool, num_registers=r)
        if self.mlp is not None:
            y = self.mlp(y)
        if self.pool > 1:
            patches = y[:, :, r:].reshape(b * s, *attn_grid, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=True)
            patches = patches.flatten(2).transpose(1, 2).reshape(b, s, h * w, -1)
            y = torch.cat([y[:, :, :r], patches], dim=2) if r else patches
        return self.out_proj(y)


class MultiViewFoundationModel(nn.Module):
    """A frozen foundation backbone made multi-view consistent by MV-Adapters.

    Args:
        backbone: the frozen backbone (see :func:`~mvfm_nerfstudio.backbones.create_backbone`).
        config: adapter architecture.

    Call it as ``model(images, intrinsics, cam_to_world) -> features`` with

    * ``images``: ``[B, S, 3, H, W]`` float in [0, 1]; H, W multiples of the patch size;
    * ``intrinsics``: ``[B, S, 3, 3]`` pinhole matrices in pixels of these images;
    * ``cam_to_world``: ``[B, S, 4, 4]`` (or ``[B, S, 3, 4]``) OpenCV camera-to-world poses;
    * ``features``: ``[B, S, F, H/p, W/p]``.
    """

    def __init__(self, backbone: FoundationBackbone, config: MVFMConfig = MVFMConfig()):
        super().__init__()
        self.backbone = backbone
        self.config = config
        depth, dim = backbone.depth, backbone.embed_dim
        blocks = range(depth) if config.adapter_blocks is None else config.adapter_blocks
        adapted = sorted({b % depth if -depth <= b < depth else _bad_block(b, depth) for b in blocks})
        if not adapted:
            raise ValueError("adapter_blocks is empty: the MVFM needs at least one adapter")
        adapter_dim = config.adapter_dim or max(config.num_heads, dim // 2)
        extra = config.ray_embed_dim if config.use_rays else 0
        n_modules = min(2, len(adapted)) if config.share_adapters else len(adapted)
        registers = backbone.num_register_tokens if config.adapt_registers else 0
        # first token the adapters see: the patch tokens, or the registers before them
        self.adapted_from = backbone.num_prefix_tokens - registers
        if config.adapter_type == "authors":
            self.adapters = nn.ModuleList(
                AuthorsAdapter(dim, config.num_heads, config.mlp_ratio, extra_dim=extra if i == 0 else 0,
                               pool=config.adapter_pool, num_registers=registers)
                for i in range(n_modules)
            )
        else:
            if registers:
                raise ValueError("adapt_registers=True needs adapter_type='authors'")
            self.adapters = nn.ModuleList(
                MVAdapter(dim, adapter_dim, config.num_heads, config.mlp_ratio, extra_dim=extra if i == 0 else 0)
                for i in range(n_modules)
            )
        # adapter_of_block[b] = index into self.adapters, or -1 for a block without adapter
        table = [-1] * depth
        for rank, b in enumerate(adapted):
            table[b] = min(rank, n_modules - 1)
        self.adapter_of_block: List[int] = table
        self.first_adapted_block = adapted[0]
        if config.use_rays:
            p = backbone.patch_size
            self.ray_embed = nn.Conv2d(6, config.ray_embed_dim, kernel_size=p, stride=p)
        else:
            self.ray_embed = None
        backbone.set_token_options(config.pos_embed_resample, config.final_norm)
        self.backbone_lora: LoRAFactors = {}
        """LoRA factors merged into the backbone (published checkpoints), by backbone parameter name; forward_base
        takes them out again (the base model is the backbone before fine-tuning)."""
        self.backbone_lora_scale: float = 1.0
        self.published: Dict[str, str] = {}
        """Where a published checkpoint came from (variant, source); set when the backbone belongs to the
        checkpoint, which then saves its backbone too (:func:`~mvfm_nerfstudio.models.checkpoint.save_adapters`)."""
        self.extra_tensors: Dict[str, torch.Tensor] = {}
        """Tensors of a published checkpoint the MVFM does not run but keeps (SAM's prompt encoder and mask
        decoder, in SAM's names)."""
        self._base_weights: Optional[Tuple[torch.device, Dict[str, torch.Tensor]]] = None

    # ------------------------------------------------------------------ info
    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Adapter and ray-embedding parameters (the backbone is frozen)."""
        return [p for name, p in self.named_parameters() if not name.startswith("backbone.")]

    def adapter_state_dict(self) -> Dict[str, torch.Tensor]:
        """State of everything but the frozen backbone (what adapter checkpoints store)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # ------------------------------------------------------------------ inputs
    def _check_inputs(
        self, images: torch.Tensor, intrinsics: Optional[torch.Tensor], cam_to_world: Optional[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        if not torch.is_tensor(images) or images.ndim != 5 or images.shape[2] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a [B, S, 3, H, W] tensor, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be float in [0, 1], got dtype {images.dtype}")
        b, s = images.shape[:2]
        if b < 1 or s < 1:
            raise ValueError(f"images must hold at least one set and one view, got {tuple(images.shape)}")
        self.backbone.check_image_size(images.shape[-2], images.shape[-1])
        lo, hi = torch.stack(torch.aminmax(images.detach())).float().tolist()  # one device synchronisation
        if not (lo == lo and hi == hi) or lo < -0.01 or hi > 1.01:  # NaN-safe
            raise ValueError(f"images must be float in [0, 1], got values in [{lo:.3g}, {hi:.3g}] (0-255 data? NaN?)")
        if (intrinsics is None) != (cam_to_world is None):
            raise CameraError("pass both intrinsics and cam_to_world, or neither (pose-free models only)")
        if intrinsics is None:
            if self.config.use_rays:
                raise CameraError(
                    "this MVFM is camera-conditioned (use_rays=True): pass intrinsics [B, S, 3, 3] and "
                    "cam_to_world [B, S, 4, 4], or build a pose-free model with use_rays=False"
                )
            return None, None
        # Cameras are a few numbers: validated and normalised on the CPU in float64, once per forward.
        intrinsics = intrinsics.detach().to("cpu", torch.float64)
        cam_to_world = to_homogeneous(cam_to_world.detach().to("cpu", torch.float64))
        if tuple(intrinsics.shape) != (b, s, 3, 3):
            raise CameraError(f"intrinsics must be [B, S, 3, 3] = [{b}, {s}, 3, 3] to match images, got {tuple(intrinsics.shape)}")
        if tuple(cam_to_world.shape) != (b, s, 4, 4):
            raise CameraError(f"cam_to_world must be [B, S, 4, 4] = [{b}, {s}, 4, 4] to match images, got {tuple(cam_to_world.shape)}")
        validate_intrinsics(intrinsics)
        validate_cam_to_world(cam_to_world)
        return intrinsics, cam_to_world

    def ray_tokens(self, intrinsics: torch.Tensor, normalized_c2w: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Patchified Plücker embedding ``[B, S, T, ray_embed_dim]`` of cameras already in the canonical frame
        (cameras on any device; the ray maps are built on the embedding's device)."""
        b, s = intrinsics.shape[:2]
        if self.config.shared_intrinsics:  # the authors' code: view 0's intrinsics for every view
            intrinsics = intrinsics[:, :1].expand(b, s, 3, 3)
        rays = plucker_ray_map(intrinsics, normalized_c2w, height, width, device=self.ray_embed.weight.device)
        emb = self.ray_embed(rays.to(self.ray_embed.weight.dtype))  # [B*S, E, h, w]
        return emb.flatten(2).transpose(1, 2).reshape(b, s, -1, emb.shape[1])

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        images: torch.Tensor,
        intrinsics: Optional[torch.Tensor] = None,
        cam_to_world: Optional[torch.Tensor] = None,
        return_layers: Optional[Sequence[int]] = None,
    ):
        """Multi-view consistent features ``[B, S, F, h, w]`` (see the class docstring for shapes).

        With ``return_layers`` (block indices, negative from the end) returns ``(features, layers)``, where
        ``layers[k]`` ``[B, S, C, h, w]`` are the patch tokens after block ``return_layers[k]`` and its adapter
        (:meth:`~mvfm_nerfstudio.backbones.vit.FoundationBackbone.layer_features`), e.g. for DPT probes.
        """
        want = self.backbone.layer_indices(return_layers)
        intrinsics, cam_to_world = self._check_inputs(images, intrinsics, cam_to_world)
        b, s, _, height, width = images.shape
        bb = self.backbone
        tokens, ctx = bb.embed(bb.normalize(images.flatten(0, 1)))
        t = ctx.grid[0] * ctx.grid[1]
        start = self.adapted_from  # prefix tokens before it (CLS, unadapted registers) are left alone
        t += bb.num_prefix_tokens - start
        normalized = None
        if cam_to_world is not None:
            normalized, _ = normalize_cameras(cam_to_world, self.config.reference_frame)  # CPU, float64
        rays = None
        if self.ray_embed is not None:
            rays = self.ray_tokens(intrinsics, normalized, height, width)
        neighbors = None
        kv_pool = self.config.kv_pool
        # knn with every other view as a neighbour and no pooling is the joint attention: take the cheaper path
        if self.config.attention == "knn" and (self.config.num_neighbors < s - 1 or kv_pool > 1):
            neighbors = select_neighbor_views(self.config.num_neighbors, s, b, normalized).to(images.device)
        layers: Dict[int, torch.Tensor] = {}
        for i in range(bb.depth):
            tokens = bb.run_block(i, tokens, ctx)
            a = self.adapter_of_block[i]
            if a < 0:
                if i in want:
                    layers[i] = bb.layer_features(tokens, ctx)
                continue
            patch = tokens[:, start:].view(b, s, t, -1)  # a view of the adapted tokens (in-place add below)
            extra = rays if i == self.first_adapted_block else None
            delta = self.adapters[a].residual(patch, ctx.grid, extra, neighbors, kv_pool)
            if torch.is_grad_enabled() and (tokens.requires_grad or delta.requires_grad):
                patch = (patch + delta).reshape(b * s, t, -1)
                tokens = torch.cat([tokens[:, :start], patch], dim=1) if start else patch
            else:  # inference: add the correction in place, no copy of the token tensor
                patch.add_(delta)
            if i in want:
                layers[i] = bb.layer_features(tokens, ctx)
        feats = bb.head(tokens, ctx)
        feats = feats.view(b, s, *feats.shape[1:])
        if return_layers is None:
            return feats
        return feats, [layers[i].view(b, s, *layers[i].shape[1:]) for i in want]

    def forward_base(self, images: torch.Tensor, return_layers: Optional[Sequence[int]] = None):
        """Features of the frozen base model, ``[B, S, 3, H, W] -> [B, S, F, h, w]`` (with ``return_layers``:
        ``(features, layers)`` as in :meth:`forward`, without adapters)."""
        if not torch.is_tensor(images) or images.ndim != 5 or images.shape[2] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a [B, S, 3, H, W] tensor, got {shape}")
        b, s = images.shape[:2]
        kwargs = {} if return_layers is None else {"return_layers": return_layers}
        if self.backbone_lora:  # the backbone before its LoRA fine-tuning
            out = torch.func.functional_call(self.backbone, self._unmerged_weights(), (images.flatten(0, 1),), kwargs)
        else:
            out = self.backbone(images.flatten(0, 1), **kwargs)
        if return_layers is None:
            return out.view(b, s, *out.shape[1:])
        feats, layers = out
        return feats.view(b, s, *feats.shape[1:]), [x.view(b, s, *x.shape[1:]) for x in layers]

    def _unmerged_weights(self) -> Dict[str, torch.Tensor]:
        """The LoRA-targeted backbone parameters without their delta (computed once per device)."""
        device = next(self.backbone.parameters()).device
        if self._base_weights is None or self._base_weights[0] != device:
            weights = unmerged_weights(self.backbone, self.backbone_lora, self.backbone_lora_scale)
            self._base_weights = (device, weights)
        return self._base_weights[1]

    # ------------------------------------------------------------------ checkpoints
    def save_adapters(self, path, metadata: Optional[Dict[str, str]] = None) -> None:
        """Write the adapters (not the backbone) as safetensors with config metadata."""
        save_adapters(self, path, metadata)

    def load_adapters(self, path) -> Dict[str, str]:
        """Load adapters saved by :meth:`save_adapters`; raises if backbone or config differ."""
        return load_adapters(self, path)


def _bad_block(b: int, depth: int) -> int:
    raise ValueError(f"adapter block index {b} is out of range for a backbone with {depth} blocks")
