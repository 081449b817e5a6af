"""Fast paths of the MVFM forward against simple references, and memory that grows linearly with S."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import orbit_cameras, randomize_adapters
from mvfm_nerfstudio import create_mvfm
from mvfm_nerfstudio.geometry.cameras import normalize_cameras, plucker_ray_map, plucker_rays
from mvfm_nerfstudio.geometry.cameras import select_neighbor_views
from mvfm_nerfstudio.models.attention import CrossViewAttention


def reference_neighbourhood(attn: CrossViewAttention, x, grid, neighbors, kv_pool):
    """One view at a time with an explicit softmax: own keys/values + pooled neighbour keys/values."""
    b, s, t, d = x.shape
    nh, hd = attn.num_heads, d // attn.num_heads
    q, k, v = attn.qkv(x).chunk(3, dim=-1)  # [B, S, T, D]

    def pool(z):  # [T, D] -> [Tp, D]
        img = z.t().reshape(1, d, *grid)
        return F.avg_pool2d(img, kv_pool, kv_pool, ceil_mode=True).reshape(d, -1).t()

    out = torch.empty_like(q)
    for bi in range(b):
        for si in range(s):
            keys = [k[bi, si]] + [pool(k[bi, j]) for j in neighbors[bi, si].tolist()]
            vals = [v[bi, si]] + [pool(v[bi, j]) for j in neighbors[bi, si].tolist()]
            kk, vv = torch.cat(keys), torch.cat(vals)  # [L, D]
            qh = q[bi, si].view(t, nh, hd).transpose(0, 1)
            kh, vh = kk.view(-1, nh, hd).transpose(0, 1), vv.view(-1, nh, hd).transpose(0, 1)
            weights = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(hd), dim=-1)
            out[bi, si] = (weights @ vh).transpose(0, 1).reshape(t, d)
    return attn.proj(out)


@pytest.mark.parametrize("kv_pool", [1, 2, 3])
def test_neighbourhood_attention_matches_per_view_reference_and_chunking(kv_pool):
    torch.manual_seed(0)
    attn = CrossViewAttention(32, 4)
    grid = (5, 4)  # odd side: pooling windows at the border are partial
    x = torch.randn(2, 6, 20, 32)
    neighbors = torch.stack([select_neighbor_views(2, 6)[0], select_neighbor_views(3, 6)[0][..., 1:]])
    ref = reference_neighbourhood(attn, x, grid, neighbors, kv_pool)
    with torch.no_grad():
        fast = attn(x, grid, neighbors, kv_pool)
        attn.gather_budget_bytes = 1  # one query view per chunk
        chunked = attn(x, grid, neighbors, kv_pool)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, fast, rtol=1e-6, atol=1e-6)


def test_fast_ray_map_matches_reference_plucker_rays():
    k, c2w = orbit_cameras(2, 3, 42, 70, seed=3)
    k[0, 1, 0, 1] = 2.0  # skew
    normalized, _ = normalize_cameras(c2w.double())
    ref = plucker_rays(k.double(), normalized, 42, 70).flatten(0, 1)
    fast = plucker_ray_map(k, normalized, 42, 70)
    assert fast.dtype == torch.float32 and fast.shape == (6, 6, 42, 70)
    torch.testing.assert_close(fast.double(), ref, rtol=0, atol=5e-6)


@pytest.mark.parametrize("mode", [dict(attention="global"), dict(attention="knn", num_neighbors=2, kv_pool=2)])
def test_inference_fast_path_equals_autograd_path(mode):
    torch.manual_seed(0)
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, **mode)
    randomize_adapters(model, seed=2)
    images = torch.rand(1, 5, 3, 56, 84)
    k, c2w = orbit_cameras(1, 5, 56, 84, seed=1)
    with torch.no_grad():
        fast = model(images, k, c2w)  # in-place residuals
    with torch.inference_mode():
        inference = model(images, k, c2w)
    slow = model(images, k, c2w)  # adapters require grad: out-of-place path
    assert slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=0, atol=0)
    torch.testing.assert_close(inference, fast, rtol=0, atol=0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (SDPA's internal tiles are not tensors it returns)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("mode", [dict(attention="global"), dict(attention="knn", num_neighbors=3),
                                  dict(attention="knn", num_neighbors=3, kv_pool=2)])
def test_largest_intermediate_grows_linearly_with_views(mode):
    """Doubling S at most doubles the largest tensor of a forward: nothing [S*T x S*T]-sized exists."""
    torch.manual_seed(0)
    model = create_mvfm("dinov2_vits14_reg", weights="random", tiny=True, **mode).eval()
    largest = {}
    for s in (8, 16, 32):
        images = torch.rand(1, s, 3, 56, 56)
        k, c2w = orbit_cameras(1, s, 56, 56, seed=0)
        with torch.no_grad(), _LargestTensor() as rec:
            model(images, k, c2w)
        largest[s] = rec.largest
    assert largest[16] <= 2 * largest[8] and largest[32] <= 2 * largest[16], largest
    # a joint attention matrix would be heads * (S*T)^2 floats: 8 heads * (32*16)^2 * 4 B = 8 MiB at S = 32
    heads, tokens = model.config.num_heads, 32 * (56 // 14) ** 2
    assert largest[32] < heads * tokens**2 * 4 / 3, largest
