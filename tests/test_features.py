"""PCA basis, similarity and the display module."""

import pytest
import torch

from mvfm_nerfstudio.features import FeatureDisplay, cosine_similarity, fit_pca, segment


def test_pca_recovers_dominant_subspace_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    basis_true = torch.linalg.qr(torch.randn(16, 3, generator=g))[0].T  # [3, 16]
    coeff = torch.randn(5000, 3, generator=g) * torch.tensor([5.0, 3.0, 2.0])
    x = coeff @ basis_true + 0.01 * torch.randn(5000, 16, generator=g) + 4.0
    pca = fit_pca(x, 3)
    # the fitted components span the true subspace
    overlap = pca.components @ basis_true.T  # singular values = cosines of principal angles
    assert torch.allclose(torch.linalg.svdvals(overlap), torch.ones(3), atol=1e-3)
    recon = pca.unproject(pca.project(x))
    assert (recon - x).abs().max() < 0.1
    again = fit_pca(x.flip(0), 3)
    assert torch.allclose(pca.components, again.components, atol=1e-4)
    rgb = pca.to_rgb(x)
    assert rgb.shape == (5000, 3) and rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(ValueError, match="components"):
        fit_pca(x, 17)


def test_display_outputs_similarity_and_segmentation():
    disp = FeatureDisplay(8, threshold=0.9)
    feats = torch.zeros(4, 5, 8)
    feats[..., 0] = 1.0
    feats[2:, :, 0] = 0.0
    feats[2:, :, 1] = 1.0
    assert set(disp(feats)) == {"feature_pca"}
    disp.set_query(feats[0, 0])
    out = disp(feats)
    assert out["similarity"].shape == (4, 5, 1)
    assert torch.equal(out["segmentation"][..., 0], (torch.arange(4) < 2).float()[:, None].expand(4, 5))
    disp.fit_basis(torch.randn(100, 8))
    sd = disp.state_dict()
    other = FeatureDisplay(8)
    other.load_state_dict(sd)
    assert torch.equal(other(feats)["feature_pca"], disp(feats)["feature_pca"])
    disp.set_query(None)
    assert "similarity" not in disp(feats)
    assert torch.allclose(cosine_similarity(feats, feats[0, 0])[0, 0], torch.ones(1))
    assert segment(torch.tensor([0.1, 0.95]), 0.9).tolist() == [0.0, 1.0]


def test_heatmap_rgb_is_matplotlib_turbo_on_a_fixed_range():
    import matplotlib
    import numpy as np

    from mvfm_nerfstudio.features import heatmap_rgb

    values = torch.cat([torch.linspace(-1.5, 1.5, 20001), torch.tensor([-1.0, 0.0, 1.0])])
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0), (0.3, 0.9)):
        t = ((values - lo) / (hi - lo)).clamp(0, 1).numpy()
        expected = matplotlib.colormaps["turbo"](t)[..., :3]
        np.testing.assert_array_equal(heatmap_rgb(values.double(), lo, hi).numpy(), expected)
    rgb = heatmap_rgb(torch.tensor([[-1.0, 1.0], [float("nan"), 5.0]]), -1.0, 1.0)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == torch.float32
    assert torch.equal(rgb[1, 0], torch.zeros(3))  # NaN: black, matplotlib's "bad" colour
    assert torch.equal(rgb[1, 1], rgb[0, 1])  # clamped to the top of the scale, never stretched
    assert float(rgb[0, 0, 2]) > float(rgb[0, 0, 0]) and float(rgb[0, 1, 0]) > float(rgb[0, 1, 2])  # blue .. red
    with pytest.raises(ValueError, match="hi > lo"):
        heatmap_rgb(torch.zeros(3), 1.0, 1.0)
