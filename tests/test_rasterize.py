"""PyTorch Gaussian rasteriser: fast tiled compositor vs dense reference vs a literal per-pixel loop.

Forward values and gradients (means, scales, quats, opacities, colours) are compared;
a single Gaussian is checked against its closed form.
"""

from __future__ import annotations

import math

import pytest
import torch

from mvfm_nerfstudio.splatting import (
    ALPHA_MAX,
    ALPHA_MIN,
    T_MIN,
    composite_reference,
    composite_tiles,
    project_gaussians,
    rasterize,
    sh_colors,
    tile_bounds,
)

PARAMS = ("means", "quats", "scales", "opacities", "colors")


def random_gaussians(n: int, channels: int = 3, seed: int = 0, opacity=(0.05, 0.95), spread: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * spread
    means[:, 2] += 3.0
    lo, hi = opacity
    return {
        "means": means,
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.rand(n, 3, generator=g) * 0.08 + 0.02,
        "opacities": torch.rand(n, generator=g) * (hi - lo) + lo,
        "colors": torch.rand(n, channels, generator=g) * 2 - 0.5,  # features may be negative
    }


def camera(width: int, height: int, focal_scale: float = 0.9):
    f = focal_scale * width
    K = torch.tensor([[f, 0.0, width / 2 + 0.3], [0.0, f * 1.05, height / 2 - 0.2], [0.0, 0.0, 1.0]])
    return torch.eye(4), K


def render_both(p, width, height, max_per_pixel=None, background=None, tile_size=16, block_size=8, max_per_block=None):
    """(reference render, reference alpha), (fast render, fast alpha, stats) from one projection each."""
    viewmat, K = camera(width, height)
    proj_r = project_gaussians(p["means"], p["quats"], p["scales"], p["opacities"], viewmat, K, width, height)
    ref = composite_reference(proj_r, p["colors"], width, height, tile_size, background)
    proj_f = project_gaussians(p["means"], p["quats"], p["scales"], p["opacities"], viewmat, K, width, height)
    fast = composite_tiles(proj_f, p["colors"], width, height, tile_size, block_size, max_per_block, max_per_pixel,
                           background)
    return ref, fast


def grads_of(p, fn, seed=1):
    """Gradients of a random linear functional of ``fn(params) -> (render, alpha)``."""
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    render, alpha = fn(q)[:2]
    g = torch.Generator().manual_seed(seed)
    loss = (render * torch.randn(render.shape, generator=g)).sum() + (alpha * torch.randn(alpha.shape, generator=g)).sum()
    loss.backward()
    return {k: q[k].grad for k in PARAMS}


def _fn(width, height, mode, max_per_pixel=None, tile_size=16, block_size=8, max_per_block=None):
    viewmat, K = camera(width, height)

    def fn(q):
        proj = project_gaussians(q["means"], q["quats"], q["scales"], q["opacities"], viewmat, K, width, height)
        if mode == "reference":
            return composite_reference(proj, q["colors"], width, height, tile_size)
        return composite_tiles(proj, q["colors"], width, height, tile_size, block_size, max_per_block, max_per_pixel)

    return fn


def sequential_loop(p, width, height, tile_size=16):
    """gsplat's CUDA forward, literally: per pixel, depth-sorted Gaussians of its tile, early stop."""
    viewmat, K = camera(width, height)
    with torch.no_grad():
        proj = project_gaussians(p["means"], p["quats"], p["scales"], p["opacities"], viewmat, K, width, height)
    tw, th = math.ceil(width / tile_size), math.ceil(height / tile_size)
    tmin, tmax = tile_bounds(proj.means2d[0], proj.radii, tile_size, tw, th)
    order = torch.argsort(proj.depths, stable=True).tolist()
    m, c, o = proj.means2d[0].double(), proj.conics.double(), proj.opacities.double()
    colors = p["colors"].double()
    out = torch.zeros(height, width, colors.shape[1], dtype=torch.float64)
    acc = torch.zeros(height, width, 1, dtype=torch.float64)
    stopped = 0
    for i in range(height):
        for j in range(width):
            T, tx, ty = 1.0, j // tile_size, i // tile_size
            for g in order:
                if proj.radii[g] <= 0 or not (tmin[g, 0] <= tx < tmax[g, 0] and tmin[g, 1] <= ty < tmax[g, 1]):
                    continue
                dx, dy = float(m[g, 0]) - (j + 0.5), float(m[g, 1]) - (i + 0.5)
                sigma = 0.5 * (float(c[g, 0]) * dx * dx + float(c[g, 2]) * dy * dy) + float(c[g, 1]) * dx * dy
                alpha = min(ALPHA_MAX, float(o[g]) * math.exp(-sigma))
                if sigma < 0 or alpha < ALPHA_MIN:
                    continue
                if T * (1 - alpha) <= T_MIN:
                    stopped += 1
                    break
                out[i, j] += colors[g] * alpha * T
                T *= 1 - alpha
            acc[i, j] = 1 - T
    return out.float(), acc.float(), stopped


def test_reference_matches_sequential_loop_with_early_stop():
    # dense, nearly opaque Gaussians so that many pixels hit gsplat's T <= 1e-4 stop
    p = random_gaussians(40, channels=2, seed=3, opacity=(0.9, 0.99), spread=0.25)
    p["scales"] = p["scales"] * 4
    width, height = 20, 18  # two tiles wide, partial tiles
    loop_render, loop_alpha, stopped = sequential_loop(p, width, height)
    assert stopped > 20, "the scene must exercise the early stop"
    viewmat, K = camera(width, height)
    proj = project_gaussians(p["means"], p["quats"], p["scales"], p["opacities"], viewmat, K, width, height)
    render, alpha = composite_reference(proj, p["colors"], width, height)
    torch.testing.assert_close(render, loop_render, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alpha, loop_alpha, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("size,block_size", [((32, 32), 8), ((40, 28), 4), ((40, 28), 16)])
def test_fast_equals_reference_without_truncation(size, block_size):
    width, height = size
    p = random_gaussians(250, channels=5)
    (r_ref, a_ref), (r_fast, a_fast, stats) = render_both(p, width, height, block_size=block_size,
                                                          background=torch.tensor([0.2, -0.1, 0.5, 1.0, 0.0]))
    assert stats["n_truncated_block"] == stats["n_truncated_pixel"] == 0
    assert stats["max_per_block_count"] > 50 and stats["max_per_pixel_count"] > 10
    assert float(a_ref.max()) > 0.9 and float(a_ref.min()) < 0.5  # non-trivial coverage
    torch.testing.assert_close(r_fast, r_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a_fast, a_ref, atol=1e-5, rtol=1e-5)


def test_fast_gradients_equal_reference_without_truncation():
    width, height = 32, 24
    p = random_gaussians(150, channels=4, seed=5)
    g_ref = grads_of(p, _fn(width, height, "reference"))
    g_fast = grads_of(p, _fn(width, height, "fast"))
    for k in PARAMS:
        assert g_ref[k].abs().max() > 0, k
        torch.testing.assert_close(g_fast[k], g_ref[k], atol=1e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("limit", [{"max_per_pixel": 6}, {"max_per_block": 24}, {"max_per_pixel": 12, "max_per_block": 40}])
def test_truncation_error_is_bounded_by_remaining_transmittance(limit):
    width, height = 32, 32
    p = random_gaussians(300, channels=3, seed=7, opacity=(0.05, 0.5))
    (r_ref, a_ref), (r_fast, a_fast, stats) = render_both(p, width, height, **limit)
    assert stats["n_truncated_block"] + stats["n_truncated_pixel"] > 0
    err = (r_fast - r_ref).abs().amax(-1, keepdim=True)
    assert float(err.max()) > 1e-3, "truncation must change something for this test to mean anything"
    bound = (1 - a_fast) * p["colors"].abs().max()
    assert bool((err <= bound + 1e-5).all())
    assert bool((a_fast <= a_ref + 1e-6).all())
    assert bool((a_ref - a_fast <= 1 - a_fast + 1e-6).all())


def test_truncation_gradient_error_shrinks_with_k_and_dropped_gaussians_get_none():
    width, height = 32, 32
    p = random_gaussians(200, channels=3, seed=7, opacity=(0.3, 0.95))
    p["scales"] = p["scales"] * 2.5
    g_ref = grads_of(p, _fn(width, height, "reference"))
    errors = []
    for k in (4, 16, 32):
        g_fast = grads_of(p, _fn(width, height, "fast", max_per_pixel=k))
        errors.append(max(float((g_fast[n] - g_ref[n]).norm() / g_ref[n].norm()) for n in PARAMS))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05, errors
    # a Gaussian that no pixel keeps among its first K contributors receives no gradient at all
    k = 4
    q = {n: v.clone().requires_grad_(True) for n, v in p.items()}
    viewmat, K = camera(width, height)
    proj = project_gaussians(q["means"], q["quats"], q["scales"], q["opacities"], viewmat, K, width, height)
    render, _, _ = composite_tiles(proj, q["colors"], width, height, max_per_pixel=k)
    render.sum().backward()
    got = q["colors"].grad.abs().sum(-1) > 0
    g_all = g_ref["colors"].abs().sum(-1) > 0
    assert int((g_all & ~got).sum()) > 0  # some contributing Gaussians were dropped everywhere ...
    assert int((got & ~g_all).sum()) == 0  # ... and nothing outside the exact support gets gradient


def test_single_gaussian_closed_form():
    width, height, f, z, s, o = 32, 32, 40.0, 4.0, 0.15, 0.3  # o * exp(-4.5) < 1/255: support rule irrelevant
    cx, cy = 13.3, 17.8
    K = torch.tensor([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
    color = torch.tensor([[0.2, 0.7, -1.5]])
    background = torch.tensor([0.1, 0.2, 0.3])
    render, alpha, meta = rasterize(torch.tensor([[0.0, 0.0, z]]), torch.tensor([[1.0, 0, 0, 0]]),
                                    torch.full((1, 3), s), torch.tensor([o]), color, torch.eye(4), K, width, height,
                                    background=background, render_depth=True, backend="torch")
    var = (f * s / z) ** 2 + 0.3  # projected variance + gsplat's eps2d blur
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    expected = (o * torch.exp(-0.5 * ((xs - cx) ** 2 + (ys - cy) ** 2) / var)).clamp_max(ALPHA_MAX)
    expected = torch.where(expected >= ALPHA_MIN, expected, torch.zeros(()))[..., None]
    assert int(meta["radii"][0, 0]) == math.ceil(3 * math.sqrt(var))
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(render[..., :3], expected * color + (1 - expected) * background, atol=1e-6, rtol=1e-5)
    covered = expected[..., 0] > 0
    torch.testing.assert_close(render[..., 3][covered], torch.full((int(covered.sum()),), z), atol=1e-5, rtol=1e-5)
    assert float(render[..., 3][~covered].abs().max()) == 0.0


def test_absgrad_is_sum_of_per_pixel_absolute_gradients():
    p = random_gaussians(60, seed=2)
    viewmat, K = camera(24, 24)
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    render, alpha, meta = rasterize(q["means"], q["quats"], q["scales"], q["opacities"], q["colors"], viewmat, K, 24, 24,
                                    absgrad=True, max_per_pixel=None)
    meta["means2d"].retain_grad()
    (render * torch.randn(render.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grad, absgrad = meta["means2d"].grad, meta["means2d"].absgrad
    assert absgrad.shape == grad.shape == (1, 60, 2)
    assert bool((absgrad >= grad.abs() - 1e-6).all())
    assert float((absgrad - grad.abs()).max()) > 1e-4  # pixels pull in different directions somewhere
    # one pixel: nothing to cancel, absgrad == |grad|
    q = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    viewmat, K = camera(1, 1)
    render, _, meta = rasterize(q["means"], q["quats"], q["scales"], q["opacities"], q["colors"], viewmat, K, 1, 1,
                                absgrad=True)
    assert int((meta["radii"] > 0).sum()) > 5
    meta["means2d"].retain_grad()
    render.sum().backward()
    torch.testing.assert_close(meta["means2d"].absgrad, meta["means2d"].grad.abs())


def test_meta_is_gsplat_compatible_for_densification():
    from gsplat.strategy import DefaultStrategy

    p = random_gaussians(80, seed=4)
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in p.items() if k != "colors"})
    viewmat, K = camera(32, 32)
    render, alpha, meta = rasterize(params["means"], params["quats"], params["scales"], params["opacities"],
                                    p["colors"], viewmat, K, 32, 32, absgrad=True)
    strategy = DefaultStrategy(absgrad=True)
    state = strategy.initialize_state()
    strategy.step_pre_backward(params, {}, state, 0, meta)
    render.sum().backward()
    strategy._update_state(params, state, meta)
    visible = meta["radii"][0] > 0
    assert bool((state["count"][visible] == 1).all()) and bool((state["count"][~visible] == 0).all())
    assert float(state["grad2d"][visible].sum()) > 0


def test_sh_degree_zero_matches_closed_form():
    n = 10
    sh = torch.randn(n, 4, 3)
    means = torch.randn(n, 3)
    rgb = sh_colors(sh, means, torch.eye(4), degree=0)
    torch.testing.assert_close(rgb, torch.clamp_min(sh[:, 0] * 0.28209479177387814 + 0.5, 0.0))
    assert not torch.allclose(sh_colors(sh, means, torch.eye(4), degree=1), rgb)


def test_input_errors_name_the_problem():
    p = random_gaussians(5)
    viewmat, K = camera(8, 8)
    args = (p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmat, K, 8, 8)
    with pytest.raises(ValueError, match="quats"):
        rasterize(p["means"], p["quats"][:, :3], *args[2:])
    with pytest.raises(ValueError, match="colors"):
        rasterize(*args[:4], p["colors"][:3], *args[5:])
    with pytest.raises(ValueError, match="backend"):
        rasterize(*args, backend="vulkan")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            rasterize(*args, backend="gsplat")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat's CUDA rasteriser needs a GPU")
@pytest.mark.cuda
def test_torch_backend_matches_gsplat_cuda():
    p = {k: v.cuda() for k, v in random_gaussians(300, channels=4).items()}
    viewmat, K = (t.cuda() for t in camera(64, 48))
    args = (p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmat, K, 64, 48)
    r_g, a_g, _ = rasterize(*args, render_depth=True, backend="gsplat")
    r_t, a_t, _ = rasterize(*args, render_depth=True, backend="torch", max_per_pixel=None)
    torch.testing.assert_close(a_t, a_g, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(r_t, r_g, atol=1e-3, rtol=1e-3)
