"""Training losses: soft-argmax location loss (cell-centre convention), keep-the-base regulariser, InfoNCE."""

from __future__ import annotations

import torch

from mvfm_nerfstudio.data import Correspondences as C

from mvfm_nerfstudio.geometry.feature_grid import (
    cell_centers,
    normalized_to_pixel,
    pixel_to_normalized,
    sample_features,
)
from mvfm_nerfstudio.training.losses import base_regularizer, info_nce_loss, location_loss, soft_argmax

PATCH = 14


def one_hot_maps(h: int, w: int, shift: int = 0) -> torch.Tensor:
    """Two views [2, h*w, h, w], a unique one-hot code per cell; view 1 is view 0 shifted right by ``shift`` cells."""
    codes = torch.eye(h * w).T.reshape(h * w, h, w)
    v1 = torch.roll(codes, shifts=shift, dims=-1)
    return torch.stack([codes, v1])


def cell_pixel_centers(h: int, w: int) -> torch.Tensor:
    """Pixel (u, v) of every cell centre, row-major [h*w, 2]."""
    return normalized_to_pixel(cell_centers((h, w)), (h * PATCH, w * PATCH))


def test_cell_centers_follow_pixel_centre_convention():
    h, w = 3, 5
    c = cell_centers((h, w))
    # cell (0, 0) covers pixels [0, 14): its centre is pixel 7 -> 2*7/70 - 1
    assert torch.allclose(c[0], torch.tensor([2 * 7 / (w * PATCH) - 1, 2 * 7 / (h * PATCH) - 1]))
    assert torch.allclose(c[-1], torch.tensor([1 - 1 / w, 1 - 1 / h]))
    px = cell_pixel_centers(h, w)
    assert torch.allclose(px[w + 2], torch.tensor([2.5 * PATCH, 1.5 * PATCH]))
    # grid_sample(align_corners=False) at cell centres returns the cell values exactly
    feats = torch.randn(1, 4, h, w)
    sampled = sample_features(feats, c.unsqueeze(0))[0]
    assert torch.allclose(sampled, feats[0].flatten(1).T, atol=1e-6)
    xy = torch.rand(10, 2) * torch.tensor([70.0, 42.0])
    assert torch.allclose(normalized_to_pixel(pixel_to_normalized(xy, (42, 70)), (42, 70)), xy, atol=1e-5)


def test_soft_argmax_of_a_peak_is_the_cell_centre_not_the_edge():
    h, w = 4, 6
    sim = torch.full((1, h * w), -1.0)
    sim[0, 0] = 1.0  # top-left cell
    pred = soft_argmax(sim, (h, w), temperature=0.01)
    # the authors' align_corners=True grid would put this at (-1, -1): half a cell off
    assert torch.allclose(pred[0], torch.tensor([-1 + 1 / w, -1 + 1 / h]), atol=1e-5)


def test_location_loss_is_zero_for_perfect_features_and_grows_with_the_shift():
    h, w = 5, 7
    size = (h * PATCH, w * PATCH)
    centres = cell_pixel_centers(h, w)
    keep = (centres[:, 0] < (w - 2) * PATCH)  # targets stay inside view 1
    src = centres[keep]
    dst = src + torch.tensor([2.0 * PATCH, 0.0])
    n = src.shape[0]
    sv, dv = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)
    perfect = one_hot_maps(h, w, shift=2)
    loss = location_loss(perfect, C(sv, dv, src, dst), size, temperature=0.02)
    assert float(loss) < 1e-5
    # features that ignore the motion (identity): the soft-argmax lands 2 cells left in x only
    wrong = one_hot_maps(h, w, shift=0)
    loss_wrong = location_loss(wrong, C(sv, dv, src, dst), size, temperature=0.02)
    assert abs(float(loss_wrong) - 0.5 * 2 * (2 / w)) < 1e-4  # mean over (x, y) of |dx| = 2 cells
    # queries between cell centres are matched by bilinear sampling + soft-argmax (sub-cell)
    half = torch.tensor([[3.0 * PATCH, 1.5 * PATCH]])  # midway between two cells
    l_half = location_loss(perfect, C(sv[:1], dv[:1], half, half + torch.tensor([2.0 * PATCH, 0.0])), size, 0.02)
    assert float(l_half) < 0.02


def test_location_loss_gradients_reach_the_features():
    feats = torch.randn(3, 8, 4, 5, requires_grad=True)
    src = torch.rand(20, 2) * torch.tensor([70.0, 56.0])
    dst = torch.rand(20, 2) * torch.tensor([70.0, 56.0])
    sv = torch.randint(0, 3, (20,))
    dv = (sv + 1) % 3
    loss = location_loss(feats, C(sv, dv, src, dst), (56, 70))
    loss.backward()
    assert feats.grad is not None and float(feats.grad.abs().sum()) > 0
    # empty correspondences: zero loss that still backpropagates
    empty = torch.zeros(0, dtype=torch.long)
    z = location_loss(feats, C(empty, empty, torch.zeros(0, 2), torch.zeros(0, 2)), (56, 70))
    assert float(z.detach()) == 0.0 and z.requires_grad


def test_base_regularizer_values():
    base = torch.randn(2, 3, 16, 4, 5)
    assert float(base_regularizer(base.clone(), base)) < 1e-6
    assert abs(float(base_regularizer(2 * base, base)) - 1.0) < 1e-5  # norm ratio 2, cosine 1
    assert abs(float(base_regularizer(-base, base)) - 2.0) < 1e-5  # norm ratio 1, cosine -1
    # orthogonal, same norm -> 1
    a = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    b = torch.tensor([0.0, 1.0]).view(2, 1, 1)
    assert abs(float(base_regularizer(a, b)) - 1.0) < 1e-6


def test_info_nce_prefers_consistent_features():
    h, w = 5, 7
    size = (h * PATCH, w * PATCH)
    centres = cell_pixel_centers(h, w)
    src = centres[centres[:, 0] < (w - 2) * PATCH][:20]
    dst = src + torch.tensor([2.0 * PATCH, 0.0])
    sv, dv = torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)
    good = info_nce_loss(one_hot_maps(h, w, 2), C(sv, dv, src, dst), size)
    bad = info_nce_loss(one_hot_maps(h, w, 0), C(sv, dv, src, dst), size)
    assert float(good) < 0.01 and float(bad) > 2.5  # log(20) ~ 3.0 for uninformative features
