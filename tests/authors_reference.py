"""The MVFM authors' checkpoint layout and forward, written independently of the package (tests only).

``write_checkpoint(variant, folder)`` writes what their ``CheckPoint.save`` writes for each released
variant (``{"model": state_dict, "n", "optimizer", "lr_scheduler"}`` in their key names, adapters 2..L as one
shared tensor stored under every slot, peft LoRA names), with random values at the tiny test size (the
registry's tiny overrides: width 64, 2 blocks, 2 heads). ``reference_forward`` computes their model's output
from that state dict with plain ``torch.nn.functional``, following their code's math step by step (peft LoRA
unmerged, their token order in the adapters, their Plücker construction); it imports nothing from
``mvfm_nerfstudio`` and nothing from timm.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

WIDTH, DEPTH, HEADS, REGS = 64, 2, 2, 4
RAY = 128
ADAPTER_HEADS = 8
RANK, ALPHA = 4, 8  # LoRA scale 2 (the published models use 32 / 32 = 1)
PATCH = {"dinov2_reg": 14, "dinov2_reg_no_plucker": 14, "dinov3": 16, "clip": 16, "sam": 16}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

SD = Dict[str, torch.Tensor]


class _Rand:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def w(self, *shape, std: Optional[float] = None) -> torch.Tensor:
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        return torch.randn(*shape, generator=self.g) * (std if std is not None else fan_in ** -0.5)

    def norm(self, n: int) -> torch.Tensor:
        return 1 + 0.1 * torch.randn(n, generator=self.g)

    def small(self, *shape) -> torch.Tensor:
        return 0.05 * torch.randn(*shape, generator=self.g)


# ---------------------------------------------------------------------------------------------- writing


def _linear(sd: SD, r: _Rand, key: str, out: int, inp: int, lora: bool, bias: bool = True) -> None:
    stem = key + (".base_layer" if lora else "")
    sd[stem + ".weight"] = r.w(out, inp)
    if bias:
        sd[stem + ".bias"] = r.small(out)
    if lora:
        sd[key + ".lora_A.default.weight"] = r.w(RANK, inp)
        sd[key + ".lora_B.default.weight"] = r.w(out, RANK, std=0.05)


def _adapters(sd: SD, r: _Rand, prefix: str, width: int, first_extra: int, ffn: bool) -> None:
    shared = None
    for slot in range(DEPTH):
        if slot >= 2:  # their ModuleList holds the same module object for blocks 2..L: equal tensors
            for k, v in shared.items():
                sd[f"{prefix}spatial_adapters.{slot}.{k}"] = v
            continue
        cin = width + (first_extra if slot == 0 else 0)
        a = {"norm.weight": r.norm(cin), "norm.bias": r.small(cin),
             "spatial_attn.qkv.weight": r.w(3 * cin, cin), "spatial_attn.qkv.bias": r.small(3 * cin),
             "spatial_attn.proj.weight": r.w(cin, cin), "spatial_attn.proj.bias": r.small(cin),
             "zero_conv.weight": r.w(width, cin, 1), "zero_conv.bias": r.small(width)}
        if ffn:
            a.update({"ffn.fc1.weight": r.w(4 * cin, cin), "ffn.fc1.bias": r.small(4 * cin),
                      "ffn.fc2.weight": r.w(cin, 4 * cin), "ffn.fc2.bias": r.small(cin)})
        for k, v in a.items():
            sd[f"{prefix}spatial_adapters.{slot}.{k}"] = v
        if slot == 1:
            shared = {k: sd[f"{prefix}spatial_adapters.1.{k}"] for k in a}


def _dinov2_state(r: _Rand, plucker: bool) -> SD:
    p, c = "vit.base_model.model.", WIDTH
    sd: SD = {p + "cls_token": r.w(1, 1, c, std=0.5), p + "pos_embed": r.w(1, 1 + 37 * 37, c, std=0.5),
              p + "register_tokens": r.w(1, REGS, c, std=0.5), p + "mask_token": torch.zeros(1, c),
              p + "patch_embed.proj.weight": r.w(c, 3, 14, 14), p + "patch_embed.proj.bias": r.small(c)}
    for i in range(DEPTH):
        b = f"{p}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "attn.qkv", 3 * c, c, lora=True)
        _linear(sd, r, b + "attn.proj", c, c, lora=False)
        sd[b + "ls1.gamma"] = 0.5 + 0.1 * r.w(c, std=1.0)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "mlp.fc1", 4 * c, c, lora=False)
        _linear(sd, r, b + "mlp.fc2", c, 4 * c, lora=False)
        sd[b + "ls2.gamma"] = 0.5 + 0.1 * r.w(c, std=1.0)
    sd[p + "norm.weight"], sd[p + "norm.bias"] = r.norm(c), r.small(c)
    emb = RAY if plucker else c  # the Plücker-free model keeps an unused [C, 6, 14, 14] embedding
    _adapters(sd, r, "", c, RAY if plucker else 0, ffn=True)
    sd["plucker_embed.proj.weight"], sd["plucker_embed.proj.bias"] = r.w(emb, 6, 14, 14), r.small(emb)
    return sd


def _dinov3_state(r: _Rand) -> SD:
    p, c, hidden = "base_model.model.", WIDTH, 256  # SwiGLU hidden: 8-aligned int(6 * 64 * 2 / 3)
    periods = 100.0 ** (2 * torch.arange(c // HEADS // 4) / (c // HEADS // 2))
    sd: SD = {p + "cls_token": r.w(1, 1, c, std=0.5), p + "storage_tokens": r.w(1, REGS, c, std=0.5),
              p + "mask_token": torch.zeros(1, c), p + "patch_embed.proj.weight": r.w(c, 3, 16, 16),
              p + "patch_embed.proj.bias": r.small(c),
              p + "rope_embed.periods": periods.to(torch.bfloat16).float()}  # their released periods are bf16-rounded
    mask = torch.ones(3 * c)
    mask[c:2 * c] = 0
    for i in range(DEPTH):
        b = f"{p}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "attn.qkv", 3 * c, c, lora=True)
        sd[b + "attn.qkv.base_layer.bias_mask"] = mask.clone()
        _linear(sd, r, b + "attn.proj", c, c, lora=True)
        sd[b + "ls1.gamma"] = 0.5 + 0.1 * r.w(c, std=1.0)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "mlp.w1", hidden, c, lora=True)
        _linear(sd, r, b + "mlp.w2", hidden, c, lora=True)
        _linear(sd, r, b + "mlp.w3", c, hidden, lora=True)
        sd[b + "ls2.gamma"] = 0.5 + 0.1 * r.w(c, std=1.0)
    sd[p + "norm.weight"], sd[p + "norm.bias"] = r.norm(c), r.small(c)
    # peft wrapped the whole model, adapters included (left random here so they change the output)
    _adapters(sd, r, p, c, RAY, ffn=False)
    sd[p + "plucker_embed.proj.weight"], sd[p + "plucker_embed.proj.bias"] = r.w(RAY, 6, 16, 16), r.small(RAY)
    return sd


def _clip_state(r: _Rand) -> SD:
    p, c = "base_model.model.", WIDTH
    sd: SD = {p + "cls_token": r.w(1, 1, c, std=0.5), p + "pos_embed": r.w(1, 1 + 24 * 24, c, std=0.5),
              p + "patch_embed.proj.base_layer.weight": r.w(c, 3, 16, 16),
              p + "patch_embed.proj.lora_A.default.weight": r.w(RANK, 3, 16, 16),
              p + "patch_embed.proj.lora_B.default.weight": r.w(c, RANK, 1, 1, std=0.05),
              p + "norm_pre.weight": r.norm(c), p + "norm_pre.bias": r.small(c)}
    for i in range(DEPTH):
        b = f"{p}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "attn.qkv", 3 * c, c, lora=True)
        _linear(sd, r, b + "attn.proj", c, c, lora=True)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "mlp.fc1", 4 * c, c, lora=True)
        _linear(sd, r, b + "mlp.fc2", c, 4 * c, lora=True)
    sd[p + "norm.weight"], sd[p + "norm.bias"] = r.norm(c), r.small(c)
    _linear(sd, r, p + "head", 1000, c, lora=True)
    _adapters(sd, r, "", c, RAY, ffn=True)
    sd["plucker_embed.proj.weight"], sd["plucker_embed.proj.bias"] = r.w(RAY, 6, 16, 16), r.small(RAY)
    return sd


def _sam_state(r: _Rand) -> SD:
    p, c, neck, hd = "image_encoder.", WIDTH, 32, WIDTH // HEADS
    sd: SD = {p + "pos_embed": r.w(1, 32, 32, c, std=0.5),  # already resized to 32x32 by their first forward
              p + "patch_embed.proj.weight": r.w(c, 3, 16, 16), p + "patch_embed.proj.bias": r.small(c)}
    for i in range(DEPTH):
        b = f"{p}blocks.{i}."
        rel = 127 if i == 1 else 27  # global block (index 1 at the tiny size): 2 * 64 - 1; windowed: 2 * 14 - 1
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "attn.qkv", 3 * c, c, lora=False)
        _linear(sd, r, b + "attn.proj", c, c, lora=False)
        sd[b + "attn.rel_pos_h"], sd[b + "attn.rel_pos_w"] = r.w(rel, hd, std=0.3), r.w(rel, hd, std=0.3)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = r.norm(c), r.small(c)
        _linear(sd, r, b + "mlp.lin1", 4 * c, c, lora=False)
        _linear(sd, r, b + "mlp.lin2", c, 4 * c, lora=False)
    sd[p + "neck.0.weight"] = r.w(neck, c, 1, 1)
    sd[p + "neck.1.weight"], sd[p + "neck.1.bias"] = r.norm(neck), r.small(neck)
    sd[p + "neck.2.weight"] = r.w(neck, neck, 3, 3)
    sd[p + "neck.3.weight"], sd[p + "neck.3.bias"] = r.norm(neck), r.small(neck)
    sd[p + "plucker_embed.proj.weight"], sd[p + "plucker_embed.proj.bias"] = r.w(RAY, 6, 16, 16), r.small(RAY)
    _adapters(sd, r, p, c, RAY, ffn=True)
    # fine-tuned decoder of stage 2 (a few of SAM's keys; kept, not run), stored in bf16 by their script
    sd["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = r.w(2, 128).to(torch.bfloat16)
    sd["mask_decoder.iou_token.weight"] = r.w(1, 256).to(torch.bfloat16)
    sd["mask_decoder.mask_tokens.weight"] = r.w(4, 256).to(torch.bfloat16)
    return sd


def authors_state_dict(variant: str, seed: int = 0) -> SD:
    r = _Rand(seed)
    if variant in ("dinov2_reg", "dinov2_reg_no_plucker"):
        return _dinov2_state(r, plucker=variant == "dinov2_reg")
    return {"dinov3": _dinov3_state, "clip": _clip_state, "sam": _sam_state}[variant](r)


ARGS = {
    "dinov2_reg": {"model_name": "vits14_reg", "stride": 14, "image_size": [518, 518], "disable_plucker": False},
    "dinov2_reg_no_plucker": {"model_name": "vits14_reg", "stride": 14, "image_size": [518, 518],
                              "disable_plucker": True},
    "dinov3": {},
    "clip": {"model_name": "ViT-B/16", "image_size": [512, 512], "disable_plucker": False},
    "sam": {"model_type": "vit_b", "image_size": [512, 512], "disable_plucker": False},
}


def write_checkpoint(variant: str, root: Path, seed: int = 0, sd: Optional[SD] = None,
                     args: Optional[dict] = None) -> SD:
    """``root/args.yaml`` + ``root/checkpoints/best.pth`` as their training script leaves them."""
    import yaml

    sd = authors_state_dict(variant, seed) if sd is None else sd
    root.mkdir(parents=True, exist_ok=True)
    full_args = {**ARGS[variant], "lora_r": RANK, "lora_alpha": ALPHA, "use_sa_ffn": variant != "dinov3",
                 "spatial_reduction": False, "exp_name": variant, "plucker_emb_dim": RAY}
    if variant == "dinov3":  # no yaml in their repo: train() dumps the merged namespace
        full_args.pop("spatial_reduction"), full_args.pop("use_sa_ffn")
    full_args.update(args or {})
    (root / "args.yaml").write_text(yaml.safe_dump(full_args))
    (root / "checkpoints").mkdir(exist_ok=True)
    torch.save({"model": sd, "n": 123, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": None},
               root / "checkpoints" / "best.pth")
    return sd


# ---------------------------------------------------------------------------------------------- forward


def plucker(intrinsics: torch.Tensor, c2w: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Their COLMAPScene.__getitem__ + get_plucker_coordinates: ``[S, 3, 3]``, ``[S, 4, 4]`` -> ``[S, 6, H, W]``."""
    c2w = c2w.double().clone()
    centres = c2w[:, :3, 3]
    dist = (centres - centres.median(0, keepdim=True).values).norm(dim=-1)
    valid = dist <= torch.clamp(torch.quantile(dist, 0.97) * 10, max=1e6)
    c2w[:, :3, 3] -= centres[valid].mean(0, keepdim=True)
    n0 = c2w[0, :3, 3].norm()
    scale = 2.0 if bool(torch.isclose(n0, torch.zeros((), dtype=n0.dtype), atol=1e-5)) else 2.0 / n0
    c2w[:, :3, 3] *= scale
    k0 = intrinsics[0].double()  # view 0's intrinsics for every view
    r0 = c2w[0, :3, :3]
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                          torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], -1).reshape(-1, 3)
    cam = pix @ torch.linalg.inv(k0).T
    out = []
    for i in range(c2w.shape[0]):
        rel = r0.T @ c2w[i, :3, :3]
        d = cam @ rel.T
        d = d / d.norm(dim=-1, keepdim=True)
        o = r0.T @ (c2w[i, :3, 3] - c2w[0, :3, 3])
        m = torch.cross(o.expand_as(d), d, dim=-1)
        out.append(torch.cat([d, m], -1).T.reshape(6, height, width))
    return torch.stack(out).float()


class _P:
    """Parameter access with peft's unmerged LoRA: ``y = base(x) + scale * B(A(x))``."""

    def __init__(self, sd: SD, prefix: str, scale: float):
        self.sd, self.prefix, self.scale = sd, prefix, scale

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.sd[self.prefix + key].float()

    def has(self, key: str) -> bool:
        return self.prefix + key in self.sd

    def linear(self, x: torch.Tensor, key: str, bias_mask: bool = False) -> torch.Tensor:
        if self.has(key + ".base_layer.weight"):
            base = key + ".base_layer"
            w, b = self[base + ".weight"], self[base + ".bias"] if self.has(base + ".bias") else None
            if bias_mask and b is not None:
                b = b * self[base + ".bias_mask"]
            y = F.linear(x, w, b)
            return y + self.scale * F.linear(F.linear(x, self[key + ".lora_A.default.weight"]),
                                             self[key + ".lora_B.default.weight"])
        b = self[key + ".bias"] if self.has(key + ".bias") else None
        if bias_mask and b is not None:
            b = b * self[key + ".bias_mask"]
        return F.linear(x, self[key + ".weight"], b)

    def ln(self, x: torch.Tensor, key: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self[key + ".weight"], self[key + ".bias"], eps)


def _mha(p: _P, x: torch.Tensor, key: str, heads: int, rope=None, skip: int = 0, bias_mask: bool = False):
    """timm-style attention: fused qkv, softmax(q k^T / sqrt(d)) v, proj."""
    n, t, c = x.shape
    qkv = p.linear(x, key + ".qkv", bias_mask=bias_mask).reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if rope is not None:
        sin, cos = rope
        def rot(z):
            z1, z2 = z[..., skip:, :].chunk(2, dim=-1)
            half = torch.cat([-z2, z1], dim=-1)
            return torch.cat([z[..., :skip, :], z[..., skip:, :] * cos + half * sin], dim=-2)
        q, k = rot(q), rot(k)
    att = torch.softmax(q @ k.transpose(-1, -2) * (c // heads) ** -0.5, dim=-1)
    return p.linear((att @ v).transpose(1, 2).reshape(n, t, c), key + ".proj")


def _adapter(p: _P, slot: int, x: torch.Tensor, grid, s: int, regs: Optional[torch.Tensor] = None,
             extra: Optional[torch.Tensor] = None, reduction: bool = False):
    """Their DinoSpatialAdapter.forward (+ the caller's residual input): ``x [S, h*w, C]`` (+ ``regs [S, R, C]``)."""
    a = f"spatial_adapters.{slot}"
    if extra is not None:
        x = torch.cat([x, extra], -1)
    cin = x.shape[-1]
    h, w = grid
    y = x.transpose(1, 2).reshape(s, cin, h, w)
    if reduction:
        y = F.max_pool2d(y, 2)
    hh, ww = y.shape[-2:]
    seq = y.flatten(2).permute(2, 0, 1)  # [t, S, C]: index t * S + s (token-major, view-minor)
    nt = seq.shape[0]
    if regs is not None:
        if regs.shape[-1] < cin:
            regs = torch.cat([regs, torch.zeros(*regs.shape[:-1], cin - regs.shape[-1])], -1)
        seq = torch.cat([seq, regs.transpose(0, 1)], 0)  # registers follow the grid tokens
    seq = seq.reshape(1, -1, cin)
    seq = p.ln(seq, a + ".norm", 1e-5)
    seq = _mha(p, seq, a + ".spatial_attn", ADAPTER_HEADS)
    if p.has(a + ".ffn.fc1.weight"):
        seq = p.linear(F.gelu(p.linear(seq, a + ".ffn.fc1")), a + ".ffn.fc2")
    seq = seq.reshape(-1, s, cin)
    grid_part = seq[:nt].permute(1, 2, 0).reshape(s, cin, hh, ww)
    if reduction:
        grid_part = F.interpolate(grid_part, size=(h, w), mode="bilinear", align_corners=True)
    zw, zb = p[a + ".zero_conv.weight"], p[a + ".zero_conv.bias"]
    dx = F.conv1d(grid_part.reshape(s, cin, h * w), zw, zb).transpose(1, 2)
    dr = None
    if regs is not None:
        dr = F.conv1d(seq[nt:].permute(1, 2, 0), zw, zb).transpose(1, 2)
    return dx, dr


def _ray_tokens(p: "_P", rays: Optional[torch.Tensor], stride: int) -> Optional[torch.Tensor]:
    """Their plucker_embed: conv 6 -> E with stride = patch, flattened to ``[S, h*w, E]``."""
    if rays is None:
        return None
    pe = F.conv2d(rays, p["plucker_embed.proj.weight"], p["plucker_embed.proj.bias"], stride=stride)
    return pe.flatten(2).transpose(1, 2)


def _dinov2(sd: SD, imgs: torch.Tensor, rays: Optional[torch.Tensor], scale: float, adapters: bool = True,
            lora: bool = True) -> torch.Tensor:
    s, _, height, width = imgs.shape
    p = _P(sd, "vit.base_model.model.", scale if lora else 0.0)
    top = _P(sd, "", 1.0)
    x = F.conv2d(imgs, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=14)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = p["pos_embed"]
    n = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:]
    if not (h * w == n * n and height == width):  # their interpolate_pos_encoding
        g = pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic", align_corners=False,
                          recompute_scale_factor=False)
        grid = g.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    x = torch.cat([(p["cls_token"] + pos[:, :1]).expand(s, -1, -1), p["register_tokens"].expand(s, -1, -1),
                   x + grid], 1)
    pe = _ray_tokens(top, rays, 14)
    for i in range(DEPTH):
        b = f"blocks.{i}"
        x = x + p[b + ".ls1.gamma"] * _mha(p, p.ln(x, b + ".norm1", 1e-6), b + ".attn", HEADS)
        x = x + p[b + ".ls2.gamma"] * p.linear(F.gelu(p.linear(p.ln(x, b + ".norm2", 1e-6), b + ".mlp.fc1")),
                                               b + ".mlp.fc2")
        if not adapters:
            continue
        sp, regs = x[:, 1 + REGS:], x[:, 1:1 + REGS]
        ds, dr = _adapter(top, i, sp, (h, w), s, regs=regs, extra=pe if i == 0 else None)
        x = torch.cat([x[:, :1], regs + dr, sp + ds], 1)
    return x[:, 1 + REGS:].transpose(1, 2).reshape(s, -1, h, w)  # no final norm


def _dinov3(sd: SD, imgs: torch.Tensor, rays: Optional[torch.Tensor], scale: float, adapters: bool = True,
            lora: bool = True) -> torch.Tensor:
    s = imgs.shape[0]
    p = _P(sd, "base_model.model.", scale if lora else 0.0)
    x = F.conv2d(imgs, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=16)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([(p["cls_token"] + 0 * p["mask_token"]).expand(s, -1, -1),
                   p["storage_tokens"].expand(s, -1, -1), x], 1)
    periods = p["rope_embed.periods"]
    cy = (torch.arange(0.5, h) / h) * 2 - 1
    cx = (torch.arange(0.5, w) / w) * 2 - 1
    coords = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).flatten(0, 1)  # [HW, 2]
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    rope = (torch.sin(angles), torch.cos(angles))
    pe = _ray_tokens(p, rays, 16)
    for i in range(DEPTH):
        b = f"blocks.{i}"
        x = x + p[b + ".ls1.gamma"] * _mha(p, p.ln(x, b + ".norm1", 1e-5), b + ".attn", HEADS, rope=rope,
                                           skip=1 + REGS, bias_mask=True)
        y = p.ln(x, b + ".norm2", 1e-5)
        y = p.linear(F.silu(p.linear(y, b + ".mlp.w1")) * p.linear(y, b + ".mlp.w2"), b + ".mlp.w3")
        x = x + p[b + ".ls2.gamma"] * y
        if not adapters:
            continue
        sp = x[:, 1 + REGS:]
        adapter = _P(sd, "base_model.model.", 1.0)
        ds, _ = _adapter(adapter, i, sp, (h, w), s, extra=pe if i == 0 else None, reduction=True)
        x = torch.cat([x[:, :1 + REGS], sp + ds], 1)
    x = p.ln(x, "norm", 1e-5)
    return x[:, 1 + REGS:].transpose(1, 2).reshape(s, -1, h, w)


def _clip(sd: SD, imgs: torch.Tensor, rays: Optional[torch.Tensor], scale: float, adapters: bool = True,
          lora: bool = True) -> torch.Tensor:
    s = imgs.shape[0]
    sc = scale if lora else 0.0
    p = _P(sd, "base_model.model.", sc)
    top = _P(sd, "", 1.0)
    x = F.conv2d(imgs, p["patch_embed.proj.base_layer.weight"], stride=16)
    x = x + sc * F.conv2d(F.conv2d(imgs, p["patch_embed.proj.lora_A.default.weight"], stride=16),
                          p["patch_embed.proj.lora_B.default.weight"])
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = p["pos_embed"]
    n = int(math.sqrt(pos.shape[1] - 1))
    g = pos[:, 1:]
    if (h, w) != (n, n):  # timm resample_abs_pos_embed defaults: bicubic with antialias
        g = F.interpolate(g.reshape(1, n, n, -1).permute(0, 3, 1, 2), size=(h, w), mode="bicubic",
                          antialias=True, align_corners=False).permute(0, 2, 3, 1).reshape(1, h * w, -1)
    x = torch.cat([p["cls_token"].expand(s, -1, -1), x], 1) + torch.cat([pos[:, :1], g], 1)
    x = p.ln(x, "norm_pre", 1e-5)
    pe = _ray_tokens(top, rays, 16)
    for i in range(DEPTH):
        b = f"blocks.{i}"
        x = x + _mha(p, p.ln(x, b + ".norm1", 1e-5), b + ".attn", HEADS)
        x = x + p.linear(F.gelu(p.linear(p.ln(x, b + ".norm2", 1e-5), b + ".mlp.fc1")), b + ".mlp.fc2")
        if not adapters:
            continue
        sp = x[:, 1:]
        ds, _ = _adapter(top, i, sp, (h, w), s, extra=pe if i == 0 else None)
        x = torch.cat([x[:, :1], sp + ds], 1)
    x = p.ln(x, "norm", 1e-5)
    return x[:, 1:].transpose(1, 2).reshape(s, -1, h, w)


def _rel_pos(q: int, k: int, rel: torch.Tensor) -> torch.Tensor:
    dist = int(2 * max(q, k) - 1)
    if rel.shape[0] != dist:
        rel = F.interpolate(rel.reshape(1, rel.shape[0], -1).permute(0, 2, 1), size=dist, mode="linear")
        rel = rel.reshape(-1, dist).permute(1, 0)
    qc = torch.arange(q)[:, None] * max(k / q, 1.0)
    kc = torch.arange(k)[None, :] * max(q / k, 1.0)
    return rel[((qc - kc) + (k - 1) * max(q / k, 1.0)).long()]


def _sam_attention(p: _P, x: torch.Tensor, key: str) -> torch.Tensor:
    """segment_anything's Attention with decomposed relative positions: ``x [B, H, W, C]``."""
    b, hh, ww, c = x.shape
    qkv = p.linear(x, key + ".qkv").reshape(b, hh * ww, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, b * HEADS, hh * ww, -1).unbind(0)
    att = (q * (c // HEADS) ** -0.5) @ k.transpose(-2, -1)
    rh, rw = _rel_pos(hh, hh, p[key + ".rel_pos_h"]), _rel_pos(ww, ww, p[key + ".rel_pos_w"])
    rq = q.reshape(b * HEADS, hh, ww, -1)
    rel_h = torch.einsum("bhwc,hkc->bhwk", rq, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", rq, rw)
    att = (att.view(-1, hh, ww, hh, ww) + rel_h[..., None] + rel_w[:, :, :, None, :]).view(-1, hh * ww, hh * ww)
    out = (att.softmax(-1) @ v).view(b, HEADS, hh, ww, -1).permute(0, 2, 3, 1, 4).reshape(b, hh, ww, -1)
    return p.linear(out, key + ".proj")


def _sam(sd: SD, imgs: torch.Tensor, rays: Optional[torch.Tensor], scale: float, adapters: bool = True,
         lora: bool = True) -> torch.Tensor:
    s = imgs.shape[0]
    p = _P(sd, "image_encoder.", 1.0)
    x = F.conv2d(imgs, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=16).permute(0, 2, 3, 1)
    h, w = x.shape[1:3]
    pos = p["pos_embed"]
    if pos.shape[1:3] != (h, w):
        pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    x = x + pos
    pe = _ray_tokens(p, rays, 16)
    win = 14
    for i in range(DEPTH):
        b = f"blocks.{i}"
        y = p.ln(x, b + ".norm1", 1e-6)
        if i != 1:  # windowed block: zero-pad to whole windows, attend per window, crop
            ph, pw = (win - h % win) % win, (win - w % win) % win
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.view(s, hp // win, win, wp // win, win, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, win, win, y.shape[-1])
            y = _sam_attention(p, y, b + ".attn")
            y = y.view(s, hp // win, wp // win, win, win, -1).permute(0, 1, 3, 2, 4, 5).reshape(s, hp, wp, -1)
            y = y[:, :h, :w]
        else:
            y = _sam_attention(p, y, b + ".attn")
        x = x + y
        x = x + p.linear(F.gelu(p.linear(p.ln(x, b + ".norm2", 1e-6), b + ".mlp.lin1")), b + ".mlp.lin2")
        if not adapters:
            continue
        flat = x.reshape(s, h * w, -1)
        ds, _ = _adapter(p, i, flat, (h, w), s, extra=pe if i == 0 else None)
        x = (flat + ds).reshape(s, h, w, -1)
    y = x.permute(0, 3, 1, 2)

    def ln2d(z, key):
        u = z.mean(1, keepdim=True)
        var = (z - u).pow(2).mean(1, keepdim=True)
        z = (z - u) / torch.sqrt(var + 1e-6)
        return p[key + ".weight"][:, None, None] * z + p[key + ".bias"][:, None, None]

    y = ln2d(F.conv2d(y, p["neck.0.weight"]), "neck.1")
    y = ln2d(F.conv2d(y, p["neck.2.weight"], padding=1), "neck.3")
    return y


def reference_forward(variant: str, sd: SD, images: torch.Tensor, intrinsics: torch.Tensor, c2w: torch.Tensor,
                      scale: float = ALPHA / RANK, adapters: bool = True, lora: bool = True) -> torch.Tensor:
    """Their model's features of one set: images ``[S, 3, H, W]`` in [0, 1], pixel intrinsics ``[S, 3, 3]``, OpenCV
    ``c2w [S, 4, 4]`` -> ``[S, F, h, w]``. ``adapters=False, lora=False`` is their base (2D) model."""
    mean, std = CLIP_NORM if variant == "clip" else IMAGENET
    x = (images - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    rays = None
    if adapters and variant != "dinov2_reg_no_plucker":
        rays = plucker(intrinsics, c2w, images.shape[-2], images.shape[-1])
    fn = {"dinov2_reg": _dinov2, "dinov2_reg_no_plucker": _dinov2, "dinov3": _dinov3, "clip": _clip, "sam": _sam}
    with torch.no_grad():
        return fn[variant](sd, x, rays, scale, adapters=adapters, lora=lora)
