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
