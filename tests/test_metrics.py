"""Evaluation metrics: hard-argmax Loc. Err. (cell-centre convention), PCK, Base Sim., viewpoint angle bins."""

from __future__ import annotations

import math

import torch

from mvfm_nerfstudio.data import Correspondences as C

from mvfm_nerfstudio.geometry.feature_grid import cell_centers, normalized_to_pixel
from mvfm_nerfstudio.evaluation.metrics import (
    base_similarity,
    bin_by_angle,
    match_argmax,
    summarize_matches,
    viewpoint_angle,
)

PATCH = 14


def shifted_codes(h: int, w: int, shift: int) -> torch.Tensor:
    codes = torch.eye(h * w).T.reshape(h * w, h, w)
    return torch.stack([codes, torch.roll(codes, shifts=shift, dims=-1)])


def test_loc_err_is_zero_at_cell_centres_and_counts_cells_otherwise():
    h, w = 4, 8
    size = (h * PATCH, w * PATCH)
    centres = normalized_to_pixel(cell_centers((h, w)), size)
    src = centres[centres[:, 0] < (w - 3) * PATCH]
    dst = src + torch.tensor([3.0 * PATCH, 0.0])
    n = len(src)
    sv, dv = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    good = match_argmax(shifted_codes(h, w, 3), C(sv, dv, src, dst), size)
    assert torch.allclose(good.pred_xy, dst) and float(good.loc_err.max()) < 1e-6
    bad = match_argmax(shifted_codes(h, w, 0), C(sv, dv, src, dst), size)
    # predicted 3 cells left in x, exact in y: mean over (x, y) of the normalised L1 = 3 cells / w
    assert torch.allclose(bad.loc_err, torch.full((n,), 3 / w), atol=1e-6)
    assert torch.allclose(bad.pixel_err, torch.full((n,), 3.0 * PATCH))
    s = summarize_matches(bad.loc_err, bad.pixel_err, [10, 42, 50])
    assert s["pck@10px"] == 0.0 and s["pck@42px"] == 1.0 and s["num_matches"] == n
    assert abs(s["loc_err"] - 3 / w) < 1e-6


def test_quantisation_floor_is_a_quarter_cell():
    # ground truth uniformly inside cells, perfect features: mean error = cell width / 4 per axis
    h, w = 16, 16
    size = (h * PATCH, w * PATCH)
    g = torch.Generator().manual_seed(0)
    src = torch.rand(4000, 2, generator=g) * torch.tensor([size[1], size[0]], dtype=torch.float32)
    cells = (src // PATCH).long()
    feats = torch.eye(h * w).T.reshape(h * w, h, w)
    feats = torch.stack([feats, feats])
    # query at the cell centre of its cell (so the sampled code is exact), truth anywhere in the cell
    q = (cells.float() + 0.5) * PATCH
    n = len(src)
    r = match_argmax(feats, C(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long), q, src), size)
    assert abs(float(r.loc_err.mean()) - (2 / w) / 4) < 0.002  # 0.031 at 16 cells


def test_base_similarity_and_viewpoint_angle():
    f = torch.randn(2, 8, 3, 4)
    assert torch.allclose(base_similarity(f, f), torch.ones(2, 3, 4), atol=1e-6)
    assert torch.allclose(base_similarity(-f, f), -torch.ones(2, 3, 4), atol=1e-6)
    a = torch.eye(4)
    b = torch.eye(4)
    t = math.radians(30)
    b[:3, :3] = torch.tensor([[math.cos(t), 0, math.sin(t)], [0, 1, 0], [-math.sin(t), 0, math.cos(t)]])
    b[:3, 3] = torch.tensor([5.0, 1.0, 2.0])  # translation does not matter
    assert abs(float(viewpoint_angle(a, b)) - 30.0) < 1e-3
    assert abs(float(viewpoint_angle(a, a))) < 1e-3


def test_bin_by_angle():
    angles = torch.tensor([0.5, 0.7, 3.2, 3.9, 12.0])
    rows = bin_by_angle(angles, {"base": torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0])}, bin_deg=2.0)
    assert [(r["angle_lo"], r["count"], r["base"]) for r in rows] == [(0.0, 2, 2.0), (2.0, 2, 6.0), (12.0, 1, 9.0)]
    assert bin_by_angle(torch.zeros(0), {"x": torch.zeros(0)}) == []
