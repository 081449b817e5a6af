"""Cross-view attention: every view's patch tokens attend to tokens of other views.

Two computations of the same operator (gsplat style: a simple reference and a fast path):

* joint (the paper): all tokens of all S views attend to each other, one
  ``scaled_dot_product_attention`` over ``S*T`` tokens; cost grows with ``S^2``.
* neighbourhood: each view attends to its own tokens plus those of ``K`` selected views
  (chosen by pose with :func:`~mvfm_nerfstudio.geometry.cameras.select_neighbor_views`),
  whose keys/values can be average-pooled on the patch grid; cost grows with ``S*K``.
  With ``K = S - 1`` and no pooling it computes exactly the joint attention.

Both use PyTorch SDPA, so no ``[tokens x tokens]`` matrix is materialised by this code.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CrossViewAttention", "all_other_views"]


def all_other_views(batch: int, views: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Neighbour table ``[B, S, S-1]`` listing, for each view, every other view."""
    idx = torch.arange(views, device=device)
    table = idx.expand(views, views)
    mask = ~torch.eye(views, dtype=torch.bool, device=device)
    return table[mask].view(views, views - 1).expand(batch, -1, -1)


class CrossViewAttention(nn.Module):
    """Multi-head attention across the views of a set.

    Args:
        dim: token width D.
        num_heads: heads (D must be divisible by it).
    """

    gather_budget_bytes: int = 64 * 2**20
    """Neighbourhood attention gathers keys/values for at most this many bytes of query views at a
    time (at least one view), so its scratch memory stays bounded however many views a set has."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        grid: Tuple[int, int],
        neighbors: Optional[torch.Tensor] = None,
        kv_pool: int = 1,
        num_registers: int = 0,
    ) -> torch.Tensor:
        """Attend across views.

        Args:
            x: ``[B, S, T, D]`` tokens of S views: ``num_registers`` register tokens, then ``h*w`` patch tokens.
            grid: ``(h, w)`` patch grid (used for pooling).
            neighbors: ``[B, S, K]`` views each view attends to besides itself; None = all
                views jointly (the paper's global attention).
            kv_pool: average-pool the neighbour views' keys/values by this factor per grid
                side (1 = full resolution). A view's own tokens are never pooled, nor are registers.
            num_registers: leading tokens per view that are not on the patch grid.

        Returns:
            ``[B, S, T, D]``.
        """
        b, s, t, d = x.shape
        nh, hd = self.num_heads, d // self.num_heads
        # [B, S, T, 3, nh, hd]; q/k/v stay strided views of it (SDPA takes any layout with a
        # contiguous last dim), so no head-splitting copies are made.
        qkv = self.qkv(x).view(b, s, t, 3, nh, hd)
        if neighbors is None and kv_pool == 1:
            out = self._joint(qkv)
        else:
            if neighbors is None:
                neighbors = all_other_views(b, s, x.device)
            out = self._neighbourhood(qkv, neighbors, grid, kv_pool, self.gather_budget_bytes, num_registers)
        return self.proj(out)

    @staticmethod
    def _joint(qkv: torch.Tensor) -> torch.Tensor:
        """All ``S*T`` tokens attend to each other: ``[B, S, T, 3, nh, hd] -> [B, S, T, nh*hd]``."""
        b, s, t, _, nh, hd = qkv.shape
        q, k, v = (z.reshape(b, s * t, nh, hd).transpose(1, 2) for z in qkv.unbind(3))  # views
        out = F.scaled_dot_product_attention(q, k, v)  # [B, nh, S*T, hd], stored as [B, S*T, nh, hd]
        return out.transpose(1, 2).reshape(b, s, t, nh * hd)

    @staticmethod
    def _neighbourhood(
        qkv: torch.Tensor, neighbors: torch.Tensor, grid: Tuple[int, int], kv_pool: int, budget_bytes: int,
        num_registers: int = 0,
    ) -> torch.Tensor:
        """Each view attends to its own tokens and its neighbours' (optionally pooled) tokens.

        Keys/values of ``[own view, neighbours...]`` are gathered with one index per chunk of
        query views into a ``[chunk, L, 2, nh, hd]`` buffer (``L = T + K*Tp``), so memory is
        ``O(S*K*Tp)`` with a chunk size bounded by ``budget_bytes``, never ``O(S^2)``.
        """
        b, s, t, _, nh, hd = qkv.shape
        kk = neighbors.shape[-1]
        flat = qkv.reshape(b * s, t, 3, nh, hd)  # a view: (B, S) merge
        q = flat[:, :, 0].transpose(1, 2)  # [B*S, nh, T, hd] view
        kv = flat[:, :, 1:]  # [B*S, T, 2, nh, hd] view
        base = (torch.arange(b, device=qkv.device) * s)[:, None, None]
        nbr = (neighbors.to(qkv.device) + base).reshape(b * s, kk)  # flat neighbour rows
        if kv_pool > 1:
            h, w = grid
            r = num_registers
            pooled = kv[:, r:].permute(0, 2, 3, 4, 1).reshape(b * s, 2 * nh * hd, h, w)
            pooled = F.avg_pool2d(pooled, kv_pool, kv_pool, ceil_mode=True)
            tp = pooled.shape[-2] * pooled.shape[-1]
            other = pooled.view(b * s, 2, nh, hd, tp).permute(0, 4, 1, 2, 3)  # [B*S, Tp, 2, nh, hd] view
            if r:  # registers are not on the grid: kept as they are, before the pooled patches
                other = torch.cat([kv[:, :r], other], dim=1)
                tp += r
            rows = nbr
        else:
            other, tp = kv, t
            own = torch.arange(b * s, device=qkv.device)[:, None]
            rows = torch.cat([own, nbr], dim=1)  # own view first: one gather builds the whole sequence
        per_view = (t + kk * tp) * 2 * nh * hd * qkv.element_size()
        chunk = max(1, min(b * s, budget_bytes // max(1, per_view)))
        out = None if chunk >= b * s else qkv.new_empty(b * s, t, nh, hd)
        for lo in range(0, b * s, chunk):
            hi = min(b * s, lo + chunk)
            gathered = other[rows[lo:hi].flatten()]  # [n*(K(+1)), Tp, 2, nh, hd], contiguous
            seq = gathered.view(hi - lo, -1, 2, nh, hd)
            if kv_pool > 1:
                seq = torch.cat([kv[lo:hi], seq], dim=1)  # own view at full resolution first
            k, v = seq[:, :, 0].transpose(1, 2), seq[:, :, 1].transpose(1, 2)  # [n, nh, L, hd] views
            res = F.scaled_dot_product_attention(q[lo:hi], k, v).transpose(1, 2)  # [n, T, nh, hd]
            if out is None:
                return res.reshape(b, s, t, nh * hd)  # one chunk: SDPA's output layout makes this a view
            out[lo:hi] = res
        return out.view(b, s, t, nh * hd)
