"""Viewer panels (mvfm_nerfstudio.nerfstudio_plugin.viewer_panels) on both MVFM methods.

Both pipelines are built through their real method configs (datamanager -> feature cache with a
tiny random backbone -> model) on one tiny generated scene, without training. Untrained models
render almost the same feature everywhere, which would make "the similarity peaks at the clicked
pixel" trivially true; so each model's feature head is given random spatial variation first
(``_vary_features``) and the tests check that the similarity map is *not* flat.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

RENDER_SCALE = {"features": 0.125, "splat": 1.0}  # nerfacto's CPU hash grids are slow: render 12x16 there


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    return make_scene(tiny_config(seed=0), tmp_path_factory.mktemp("viewer_panels") / "scene", progress=False)


def _tiny_features(config, scene: Path, cache: Path) -> None:
    dm = config.datamanager
    dm.data = dm.dataparser.data = scene
    f = dm.features
    f.weights, f.tiny, f.feature_resolution, f.feature_dim, f.cache_dir = "random", True, 8, 16, cache


def _features_pipeline(scene: Path, cache: Path):
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features_config

    config = mvfm_features_config().pipeline
    _tiny_features(config, scene, cache)
    config.datamanager.train_num_rays_per_batch = config.datamanager.eval_num_rays_per_batch = 128
    m = config.model
    m.num_nerf_samples_per_ray, m.num_proposal_samples_per_ray = 16, (32, 16)
    m.num_levels, m.log2_hashmap_size, m.max_res = 8, 14, 256
    m.feature_num_levels, m.feature_log2_hashmap_size = 6, 12
    m.eval_num_rays_per_chunk = 1 << 12
    return config.setup(device="cpu", test_mode="val")


def _splat_pipeline(scene: Path, cache: Path):
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat_config

    config = mvfm_splat_config().pipeline
    _tiny_features(config, scene, cache)
    # a compact random cloud in front of the cameras (the scene has no .ply to seed from)
    config.model.num_random, config.model.random_scale = 500, 0.6
    return config.setup(device="cpu", test_mode="val")


@torch.no_grad()
def _vary_features(model) -> None:
    """Give the untrained feature head random spatial variation (see the module docstring)."""
    g = torch.Generator().manual_seed(0)
    if hasattr(model, "feature_field"):  # mvfm-features: hash-grid feature field
        for p in model.feature_field.encoding.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    else:  # mvfm-splat: per-Gaussian latents, mostly opaque Gaussians
        model.gauss_params["latents"].copy_(torch.randn(model.gauss_params["latents"].shape, generator=g))
        model.gauss_params["opacities"].fill_(4.0)


@pytest.fixture(scope="module")
def pipelines(scene, tmp_path_factory):
    cache = tmp_path_factory.mktemp("feature_cache")
    torch.manual_seed(0)  # splatfacto's random initialisation
    out = {"features": _features_pipeline(scene, cache), "splat": _splat_pipeline(scene, cache)}
    for pipe in out.values():
        pipe.eval()
        _vary_features(pipe.model)
    return out


def _camera(pipe, name: str, index: int = 1, scale: float = 1.0):
    cam = pipe.datamanager.train_dataset.cameras[index : index + 1]
    cam.rescale_output_resolution(RENDER_SCALE[name] * scale)
    return cam


def _click_at(cam, row: int, col: int):
    """The ViewerClick the viewer would send for pixel (row, col) of ``cam`` (world frame, unit direction)."""
    from nerfstudio.viewer.viewer_elements import ViewerClick

    ray = cam.generate_rays(camera_indices=0, coords=torch.tensor([[row + 0.5, col + 0.5]]))
    w, h = int(cam.width), int(cam.height)
    return ViewerClick(tuple(ray.origins[0].tolist()), tuple(ray.directions[0].tolist()),
                       ((col + 0.5) / w, (row + 0.5) / h))


def _covered_pixel(model, cam):
    """A pixel near the image centre whose ray hits the (opaque) scene."""
    with torch.no_grad():
        acc = model.get_outputs_for_camera(cam)["accumulation"][..., 0]
    h, w = acc.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = (rows - h / 2) ** 2 + (cols - w / 2) ** 2
    dist[acc < 0.9] = float("inf")
    r, c = divmod(int(dist.argmin()), w)
    assert acc[r, c] >= 0.9
    return r, c


def test_viewer_walk_finds_the_panels_without_looping(pipelines):
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

    for name, pipe in pipelines.items():
        elements = dict(parse_object(pipe, ViewerElement, "Custom Elements"))
        prefix = "Custom Elements/model/feature_panels/"
        assert {k[len(prefix):] for k in elements if k.startswith(prefix)} == {
            "pca_lock", "pca_refresh", "query_pick", "query_status", "query_threshold", "query_unset"}, name
        controls = [c for _, c in parse_object(pipe, ViewerControl, "Custom Elements")]
        assert controls == [pipe.model.feature_panels.viewer_control]
        # no parameters/buffers of their own: checkpoints are unchanged
        assert not any(k.startswith("feature_panels") for k in pipe.model.state_dict())
        panels = pipe.model.feature_panels
        assert panels.query_threshold.value == pytest.approx(pipe.model.feature_display.threshold)
        # a query that came with a checkpoint (buffers) shows in the status at the next render
        assert panels.query_status.value == "none"
        pipe.model.feature_display.set_query(torch.ones(pipe.model.feature_dim))
        panels.after_render({})
        assert panels.query_status.value == "set (from the checkpoint)"
        panels.clear_query()


@pytest.mark.parametrize("name", ["features", "splat"])
def test_simulated_click_produces_similarity_and_segmentation(pipelines, name):
    model = pipelines[name].model
    panels = model.feature_panels
    cam = _camera(pipelines[name], name)
    h, w = int(cam.height), int(cam.width)
    r, c = _covered_pixel(model, cam)
    query = panels.on_click(_click_at(cam, r, c))
    assert query.shape == (model.feature_dim,) and bool(model.feature_display.has_query)
    assert panels.query_status.value.startswith("set from a click")
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    assert out["similarity"].shape == (h, w, 1) and out["segmentation"].shape == (h, w, 1)
    assert out["segmentation_overlay"].shape == (h, w, 3)
    sim = out["similarity"][..., 0]
    # the rendered feature at the clicked pixel is the query: NeRF renders the identical ray; splats differ a
    # little (the 1-pixel query camera has another focal length, so gsplat's 0.3 px blur differs)
    if name == "features":
        assert float(sim[r, c]) == pytest.approx(1.0, abs=1e-4)
        assert float(sim.max()) == pytest.approx(float(sim[r, c]), abs=1e-4)
    else:
        assert float(sim[r, c]) >= 0.9
        assert float(sim[r, c]) >= float(sim.flatten().quantile(0.9))
    assert float(sim.min()) < 0.8  # not a flat map: the peak means something
    t = model.feature_display.threshold
    assert torch.equal(out["segmentation"], (out["similarity"] >= t).float())
    assert float(out["segmentation"][r, c]) == 1.0

    panels.query_unset.cb_hook(panels.query_unset)  # "Clear query"
    assert not bool(model.feature_display.has_query) and panels.query_status.value == "none"
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    assert not {"similarity", "segmentation", "segmentation_overlay"} & set(out)
    assert {"feature", "feature_pca"} <= set(out)


def test_threshold_slider_and_pca_lock_refresh(pipelines):
    from mvfm_nerfstudio.features import fit_pca

    model = pipelines["splat"].model
    panels, display = model.feature_panels, model.feature_display
    cam, other = _camera(pipelines["splat"], "splat", 1, 0.5), _camera(pipelines["splat"], "splat", 4, 0.5)
    r, c = _covered_pixel(model, cam)
    panels.on_click(_click_at(cam, r, c))
    slider = panels.query_threshold
    before = display.pca_components.clone()
    for value in (0.95, 0.5):
        slider.value = value
        slider.cb_hook(slider)
        assert display.threshold == value
        with torch.no_grad():
            locked = model.get_outputs_for_camera(cam)
        assert torch.equal(locked["segmentation"], (locked["similarity"] >= value).float())
    assert float(locked["segmentation"].mean()) > 0
    assert torch.equal(display.pca_components, before)  # locked: renders never change the colours
    panels.pca_refresh.cb_hook(panels.pca_refresh)
    with torch.no_grad():
        refreshed = model.get_outputs_for_camera(cam)
    expected = fit_pca(refreshed["feature"].reshape(-1, model.feature_dim), 3)
    assert torch.allclose(display.pca_components, expected.components, atol=1e-5)
    assert torch.allclose(refreshed["feature_pca"], expected.to_rgb(refreshed["feature"]), atol=1e-5)
    assert not torch.allclose(refreshed["feature_pca"], locked["feature_pca"], atol=1e-2)
    refit = display.pca_components.clone()
    with torch.no_grad():
        model.get_outputs_for_camera(other)
    assert torch.equal(display.pca_components, refit)  # one refresh = one refit, then locked again
    panels.pca_lock.value = False
    with torch.no_grad():
        out = model.get_outputs_for_camera(other)
    assert torch.allclose(display.pca_components, fit_pca(out["feature"].reshape(-1, model.feature_dim), 3).components,
                          atol=1e-5)  # unlocked: follows every render
    panels.pca_lock.value = True
    panels.clear_query()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_click_through_a_running_viewer(pipelines, scene, tmp_path):
    """The real Viewer on 127.0.0.1: panels installed, 'Pick query point' arms viser's pointer callback, a click
    event (as viser delivers it, in viser's scaled coordinates) sets the query and disarms it again."""
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO, Viewer
    from viser import ScenePointerEvent

    pipe = pipelines["features"]
    model, panels = pipe.model, pipe.model.feature_panels
    port = _free_port()
    viewer = Viewer(ViewerConfig(websocket_host="127.0.0.1", websocket_port=port), log_filename=tmp_path / "log.txt",
                    datapath=scene, pipeline=pipe, train_lock=threading.Lock())
    try:
        deadline, status = time.monotonic() + 30, None
        while status is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as resp:
                    status = resp.status
            except OSError:
                time.sleep(0.2)
        assert status == 200
        assert panels.viewer_control.viewer is viewer
        assert all(e.gui_handle is not None for e in (panels.pca_lock, panels.query_pick, panels.query_threshold))
        server = viewer.viser_server
        assert server.scene._scene_pointer_cb is None

        panels.query_pick.cb_hook(panels.query_pick)  # press "Pick query point" (the viewer's locked wrapper)
        assert server.scene._scene_pointer_cb is not None and panels.query_pick.gui_handle.disabled
        cam = _camera(pipe, "features")
        click = _click_at(cam, 5, 7)
        server.scene._scene_pointer_cb(ScenePointerEvent(
            client=None, client_id=0, event_type="click",
            ray_origin=tuple(x * VISER_NERFSTUDIO_SCALE_RATIO for x in click.origin),
            ray_direction=click.direction, screen_pos=(click.screen_pos,)))
        assert bool(model.feature_display.has_query)
        expected = model.feature_at_ray(torch.tensor(click.origin), torch.tensor(click.direction))
        assert torch.allclose(model.feature_display.query, expected, atol=1e-5)
        assert server.scene._scene_pointer_cb is None  # one pick per press
        assert not panels.query_pick.gui_handle.disabled
    finally:
        panels.clear_query()
        viewer.viser_server.stop()
        # detach the panels from the stopped server (other tests use them offline)
        for element in (panels.pca_lock, panels.pca_refresh, panels.query_pick, panels.query_status,
                        panels.query_threshold, panels.query_unset):
            element.gui_handle = None
        panels.viewer_control = type(panels.viewer_control)()
