"""Shared fixtures: synthetic cameras, randomised (non-identity) adapters, a free local port."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def look_at_opencv(center: torch.Tensor, target: torch.Tensor, up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """OpenCV cam-to-world [4, 4] for a camera at ``center`` looking at ``target``."""
    z = target - center
    z = z / z.norm()
    up_t = torch.tensor(up, dtype=center.dtype)
    x = torch.linalg.cross(z, up_t)
    x = x / x.norm()
    y = torch.linalg.cross(z, x)
    m = torch.eye(4, dtype=center.dtype)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = x, y, z, center
    return m


def orbit_cameras(batch: int, views: int, height: int, width: int, seed: int = 0, radius: float = 3.0):
    """Random cameras on a sphere cap looking at the origin; returns (intrinsics, cam_to_world)."""
    g = torch.Generator().manual_seed(seed)
    c2w = torch.empty(batch, views, 4, 4, dtype=torch.float64)
    for b in range(batch):
        for s in range(views):
            az = float(torch.rand(1, generator=g)) * 2 * math.pi
            el = 0.2 + 0.8 * float(torch.rand(1, generator=g))
            r = radius * (0.8 + 0.4 * float(torch.rand(1, generator=g)))
            center = torch.tensor([r * math.cos(az) * math.cos(el), r * math.sin(az) * math.cos(el), r * math.sin(el)],
                                  dtype=torch.float64)
            target = 0.2 * torch.randn(3, generator=g, dtype=torch.float64)
            c2w[b, s] = look_at_opencv(center, target)
    focal = 0.9 * max(height, width)
    k = torch.tensor([[focal, 0, width / 2], [0, focal * 1.05, height / 2], [0, 0, 1]], dtype=torch.float64)
    return k.expand(batch, views, 3, 3).float().clone(), c2w.float()


def randomize_adapters(model, seed: int = 0, scale: float = 0.5) -> None:
    """Give every zero-initialised output projection random weights so adapters are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("backbone."):
                continue
            if "out_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale / math.sqrt(max(1, p.shape[-1])))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for gloo rendezvous and test servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
