"""Viewer panels (mvfm_nerfstudio.nerfstudio_plugin.viewer_panels) on both MVFM methods.

Both pipelines are built through their real method configs (datamanager -> feature cache with a
tiny random backbone -> model) on one tiny generated scene, without training. Untrained models
render almost the same feature everywhere, which would make "the similarity peaks at the clicked
pixel" trivially true; so each model's feature head is given random spatial variation first
(``_vary_features``) and the tests check that the similarity map is *not* flat.
"""

from __future__ import annotations

import base64
import io
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import free_port
from mvfm_nerfstudio.features import MASK_COLOR, cosine_similarity, heatmap_rgb, overlay_mask

pytestmark = pytest.mark.slow

RENDER_SCALE = {"features": 0.125, "splat": 1.0}  # nerfacto's CPU hash grids are slow: render 12x16 there


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    return make_scene(tiny_config(seed=0), tmp_path_factory.mktemp("viewer_panels") / "scene", progress=False)


def _tiny_features(config, scene: Path, cache: Path, **features) -> None:
    dm = config.datamanager
    dm.data = dm.dataparser.data = scene
    f = dm.features
    f.weights, f.tiny, f.feature_resolution, f.feature_dim, f.cache_dir = "random", True, 8, 16, cache
    for name, value in features.items():  # e.g. backbone, text_space (tests/test_text.py)
        setattr(f, name, value)


def _features_pipeline(scene: Path, cache: Path, **features):
    from mvfm_nerfstudio.nerfstudio_plugin.features_method import mvfm_features_config

    config = mvfm_features_config().pipeline
    _tiny_features(config, scene, cache, **features)
    config.datamanager.train_num_rays_per_batch = config.datamanager.eval_num_rays_per_batch = 128
    m = config.model
    m.num_nerf_samples_per_ray, m.num_proposal_samples_per_ray = 16, (32, 16)
    m.num_levels, m.log2_hashmap_size, m.max_res = 8, 14, 256
    m.feature_num_levels, m.feature_log2_hashmap_size = 6, 12
    m.eval_num_rays_per_chunk = 1 << 12
    return config.setup(device="cpu", test_mode="val")


def _splat_pipeline(scene: Path, cache: Path, **features):
    from mvfm_nerfstudio.nerfstudio_plugin.splat_method import mvfm_splat_config

    config = mvfm_splat_config().pipeline
    _tiny_features(config, scene, cache, **features)
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


def _cosine(model, out):
    """The raw cosine behind the viewer's colour image: rendered feature vs the query, ``[H, W]``."""
    return cosine_similarity(out["feature"], model.feature_display.query)[..., 0]


def _mask_image(mask):
    """What 'segmentation' shows: MASK_COLOR where ``mask [H, W]``, black elsewhere."""
    return torch.where(mask[..., None], torch.tensor(MASK_COLOR), torch.zeros(3))


def test_viewer_walk_finds_only_the_control_and_no_element(pipelines):
    """The panels install their own elements (in the 'MVFM features' folder), so Nerfstudio's walk must not
    find any (it would install them a second time under "Custom Elements" and wrap them in its lock)."""
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerControl, ViewerElement

    for name, pipe in pipelines.items():
        panels = pipe.model.feature_panels
        assert parse_object(pipe, ViewerElement, "Custom Elements") == [], name
        controls = [c for _, c in parse_object(pipe, ViewerControl, "Custom Elements")]
        assert controls == [panels.viewer_control]
        # every built-in control is in a section, in display order
        items = [item for section in panels.sections for item in section.items]
        assert [s.title for s in panels.sections] == [None, "Click query", "PCA colours"]
        assert [i for i in items if isinstance(i, ViewerElement)] == [
            panels.controls[k] for k in ("pick", "threshold", "clear", "pca_lock", "pca_refresh")]
        assert [i.name for i in items if isinstance(i, ViewerElement)] == [
            "Pick query point", "Segmentation threshold", "Clear query", "Lock PCA colours", "Refresh PCA from view"]
        # no parameters/buffers of their own: checkpoints are unchanged
        assert not any(k.startswith("feature_panels") for k in pipe.model.state_dict())
        assert panels.controls["threshold"].value == pytest.approx(pipe.model.feature_display.threshold)
        # a query that came with a checkpoint (buffers) shows in the status at the next render
        assert panels.status == "none"
        pipe.model.feature_display.set_query(torch.ones(pipe.model.feature_dim))
        panels.after_render({})
        assert panels.status == "set (from the checkpoint)"
        panels.clear_query()
        assert panels.status == "none"


@pytest.mark.parametrize("name", ["features", "splat"])
def test_simulated_click_produces_similarity_and_segmentation(pipelines, name):
    model = pipelines[name].model
    panels = model.feature_panels
    cam = _camera(pipelines[name], name)
    h, w = int(cam.height), int(cam.width)
    r, c = _covered_pixel(model, cam)
    query = panels.on_click(_click_at(cam, r, c), render_size=(w, h))
    assert query.shape == (model.feature_dim,) and bool(model.feature_display.has_query)
    assert panels.status == f"pixel ({c}, {r}) of {w}×{h}"
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    assert out["similarity"].shape == (h, w, 3) and out["segmentation"].shape == (h, w, 3)
    assert out["segmentation_overlay"].shape == (h, w, 3)
    sim = _cosine(model, out)
    # the rendered feature at the clicked pixel is the query: NeRF renders the identical ray; splats differ a
    # little (the 1-pixel query camera has another focal length, so gsplat's 0.3 px blur differs)
    if name == "features":
        assert float(sim[r, c]) == pytest.approx(1.0, abs=1e-4)
        assert float(sim.max()) == pytest.approx(float(sim[r, c]), abs=1e-4)
    else:
        assert float(sim[r, c]) >= 0.9
        assert float(sim[r, c]) >= float(sim.flatten().quantile(0.9))
    assert float(sim.min()) < 0.8  # not a flat map: the peak means something
    # displayed on the fixed scale [-1, 1]: the same cosine is the same colour in every view
    assert torch.equal(out["similarity"], heatmap_rgb(sim, -1.0, 1.0))
    assert torch.allclose(out["similarity"][r, c], heatmap_rgb(torch.tensor(1.0), -1.0, 1.0), atol=0.05)
    t = model.feature_display.threshold
    mask = sim >= t
    assert bool(mask[r, c]) and not bool(mask.all())
    assert torch.allclose(out["segmentation"], _mask_image(mask))
    assert torch.allclose(out["segmentation_overlay"], overlay_mask(out["rgb"], mask, panels.overlay_alpha))
    other = _camera(pipelines[name], name, index=4)  # another view, the same scale
    with torch.no_grad():
        out2 = model.get_outputs_for_camera(other)
    assert torch.equal(out2["similarity"], heatmap_rgb(_cosine(model, out2), -1.0, 1.0))

    panels.controls["clear"].cb_hook(panels.controls["clear"])  # "Clear query"
    assert not bool(model.feature_display.has_query) and panels.status == "none"
    with torch.no_grad():
        out = model.get_outputs_for_camera(cam)
    assert not {"similarity", "segmentation", "segmentation_overlay"} & set(out)
    assert {"feature", "feature_pca"} <= set(out)


def _scale_line_column(panels) -> int:
    """Column of the white threshold line in the colour-scale PNG of the panels (data URL in the markdown)."""
    from PIL import Image

    text = panels.sections[1].items[2].text
    data = text.split("data:image/png;base64,")[1].split(")")[0]
    bar = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    white = np.where((bar[0] == 255).all(-1))[0]
    assert len(white) == 3 and white[2] - white[0] == 2
    return int(white[1])


def test_threshold_slider_and_pca_lock_refresh(pipelines):
    from mvfm_nerfstudio.features import fit_pca

    model = pipelines["splat"].model
    panels, display = model.feature_panels, model.feature_display
    cam, other = _camera(pipelines["splat"], "splat", 1, 0.5), _camera(pipelines["splat"], "splat", 4, 0.5)
    r, c = _covered_pixel(model, cam)
    panels.on_click(_click_at(cam, r, c))
    assert panels.status.startswith("point (") and panels.status.endswith(") of the render")  # no render size
    slider = panels.controls["threshold"]
    before = display.pca_components.clone()
    for value in (0.95, 0.5):
        slider.value = value
        slider.cb_hook(slider)
        assert display.threshold == value
        # the colour scale marks the threshold where that cosine's colour is (256 columns over [-1, 1])
        assert _scale_line_column(panels) == round((value + 1) / 2 * 255)
        assert f"threshold {value:.2f}" in panels.sections[1].items[2].text
        with torch.no_grad():
            locked = model.get_outputs_for_camera(cam)
        assert torch.allclose(locked["segmentation"], _mask_image(_cosine(model, locked) >= value))
    assert float(locked["segmentation"].mean()) > 0
    assert torch.equal(display.pca_components, before)  # locked: renders never change the colours
    panels.controls["pca_refresh"].cb_hook(panels.controls["pca_refresh"])
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
    panels.controls["pca_lock"].value = False
    with torch.no_grad():
        out = model.get_outputs_for_camera(other)
    assert torch.allclose(display.pca_components, fit_pca(out["feature"].reshape(-1, model.feature_dim), 3).components,
                          atol=1e-5)  # unlocked: follows every render
    panels.controls["pca_lock"].value = True
    panels.clear_query()


def test_panels_reject_a_bad_similarity_range(pipelines):
    from mvfm_nerfstudio.nerfstudio_plugin.viewer_panels import FeaturePanels

    with pytest.raises(ValueError, match="similarity_range"):
        FeaturePanels(pipelines["splat"].model, similarity_range=(1.0, -1.0))


@pytest.fixture()
def running_viewer(pipelines, scene, tmp_path):
    """The real Viewer on 127.0.0.1 around the mvfm-features pipeline (no browser connects)."""
    from nerfstudio.configs.base_config import ViewerConfig
    from nerfstudio.viewer.viewer import Viewer

    pipe = pipelines["features"]
    panels = pipe.model.feature_panels
    port = free_port()
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
        yield viewer, pipe
    finally:
        panels.clear_query()
        viewer.viser_server.stop()
        panels.detach_viewer()  # other tests use the panels offline


class _OwnedLock:
    """The viewer's lock, recording which thread holds it."""

    def __init__(self):
        self._lock, self.owner = threading.Lock(), None

    def __enter__(self):
        self._lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc):
        self.owner = None
        self._lock.release()


def _render_holding_the_lock(viewer):
    """A stand-in render on another thread: holds the viewer's lock until the viewer is asked to re-render (the
    interrupt RenderStateMachine reacts to). Returns (thread, started event, interrupted event)."""
    lock, started, interrupted = _OwnedLock(), threading.Event(), threading.Event()
    viewer.train_lock = lock
    real_rerender = viewer._trigger_rerender
    viewer._trigger_rerender = lambda: [interrupted.set(), real_rerender()]

    def render():
        with lock:
            started.set()
            interrupted.wait(30)

    thread = threading.Thread(target=render)
    thread.start()
    assert started.wait(10)
    return thread, interrupted


def _click_event(click, client):
    """The viser event the browser sends for ``click`` (viser's scene is the model's world x 10)."""
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
    from viser import ScenePointerEvent

    return ScenePointerEvent(client=client, client_id=0, event_type="click",
                             ray_origin=tuple(x * VISER_NERFSTUDIO_SCALE_RATIO for x in click.origin),
                             ray_direction=click.direction, screen_pos=(click.screen_pos,))


def test_panels_sit_at_the_top_of_the_control_tab(running_viewer):
    """Placement (viser 0.2.7 internals, read here to check it): the 'MVFM features' folder is the first child
    of the Control tab, holds the sections, and Nerfstudio made no "Custom Elements" folder."""
    import viser
    from viser import GuiFolderHandle

    from mvfm_nerfstudio.nerfstudio_plugin.viewer_panels import PANELS_TITLE, _control_tab

    viewer, pipe = running_viewer
    panels = pipe.model.feature_panels
    gui = viewer.viser_server.gui
    assert panels.viewer_control.viewer is viewer
    tab = _control_tab(gui)
    assert tab is not None and isinstance(tab, viser.GuiTabHandle)
    children = sorted(tab._children.values(), key=lambda h: h.order)
    assert isinstance(children[0], GuiFolderHandle)
    folder = children[0]
    # labels are not kept on folder handles: find ours through the folder that holds the status markdown
    status_parent = panels.sections[0].items[0].gui_handle._parent_container_id
    assert status_parent == folder._id
    subfolders = [h for h in folder._children.values() if isinstance(h, GuiFolderHandle)]
    assert len(subfolders) == 2
    pick = panels.controls["pick"].gui_handle
    assert pick is not None and pick._impl.parent_container_id in {f._id for f in subfolders}
    assert PANELS_TITLE == "MVFM features"
    assert all(e.gui_handle is not None for e in panels.controls.values())
    # without viser's internals the lookup degrades (warning, then the panels go to the root)
    with pytest.warns(UserWarning, match="Control tab not found"):
        assert _control_tab(SimpleNamespace()) is None


def test_colour_options_hidden_for_the_panels_outputs(running_viewer):
    viewer, _ = running_viewer
    panel = viewer.control_panel
    panel.update_output_options(["rgb", "depth", "feature_pca", "similarity", "segmentation_overlay"])
    colour_options = panel._elements_by_tag["colormap"]
    assert {e.name for e in colour_options} == {"Invert", "Normalize", "Min", "Max"}
    for output, hidden in (("depth", False), ("feature_pca", True), ("similarity", True), ("depth", False),
                           ("segmentation_overlay", True), ("rgb", True)):
        panel._output_render.gui_handle._impl.value = output  # set without viser's (asynchronous) callbacks
        panel.update_control_panel()  # what those callbacks run
        assert panel._colormap.gui_handle.disabled is hidden, output
        assert all(e.gui_handle.visible is not hidden for e in colour_options), output


def test_click_through_a_running_viewer(running_viewer):
    """'Pick query point' arms viser's pointer callback; a click event (as viser delivers it) shows its pixel and a
    marker before the lookup, which (ns-viewer: no trainer) does not wait for a render holding the lock; the query
    is then set under the lock after interrupting the render; one pick per press; Clear leaves query outputs."""
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    from mvfm_nerfstudio.nerfstudio_plugin.viewer_panels import MARKER_ANGLE

    viewer, pipe = running_viewer
    model, panels = pipe.model, pipe.model.feature_panels
    server = viewer.viser_server
    assert server.scene._scene_pointer_cb is None
    pick = panels.controls["pick"]
    pick.cb_hook(pick)  # press "Pick query point"
    assert server.scene._scene_pointer_cb is not None and pick.gui_handle.disabled
    assert panels.status == "click a point in the render"

    real_lookup, seen = model.feature_at_ray, {}

    def lookup(*args, **kwargs):
        seen.update(status=panels.status, marker=panels._marker, owner=viewer.train_lock.owner,
                    interrupted=interrupted.is_set())
        return real_lookup(*args, **kwargs)

    lock = viewer.train_lock
    holder, interrupted = _render_holding_the_lock(viewer)
    model.feature_at_ray = lookup
    cam = _camera(pipe, "features")
    click = _click_at(cam, 5, 7)
    client = SimpleNamespace(camera=SimpleNamespace(aspect=4 / 3))  # 512 x 384 at the default Max res 512
    try:
        server.scene._scene_pointer_cb(_click_event(click, client))
    finally:
        del model.feature_at_ray
        interrupted.set()
        holder.join(10)
        viewer.train_lock = lock
        del viewer._trigger_rerender
    x, y = click.screen_pos
    where = f"pixel ({int(x * 512)}, {int(y * 384)}) of 512×384"
    # feedback came first, and the lookup ran while the "render" still held the lock
    assert seen["status"] == f"picking {where} …" and seen["marker"] is not None
    assert seen["owner"] == holder.ident and not seen["interrupted"]
    assert panels.status == where
    assert bool(model.feature_display.has_query)
    expected, depth = real_lookup(torch.tensor(click.origin), torch.tensor(click.direction), with_depth=True)
    assert torch.allclose(model.feature_display.query, expected, atol=1e-5)
    d = torch.tensor(click.direction) / torch.tensor(click.direction).norm()
    if torch.isfinite(depth):  # the marker sits on the surface, just in front of it
        radius = MARKER_ANGLE * float(depth)
        centre = (torch.tensor(click.origin) + (float(depth) - 3 * radius) * d) * VISER_NERFSTUDIO_SCALE_RATIO
        for handle in panels._marker:  # sphere and label
            np.testing.assert_allclose(handle.position, centre.numpy(), rtol=1e-5, atol=1e-5)
    else:
        assert panels._marker is None
    assert server.scene._scene_pointer_cb is None  # one pick per press
    assert not pick.gui_handle.disabled

    # a click that cannot be rendered keeps the query, says why, and shows the query's marker again
    query, marker_at = model.feature_display.query.clone(), [h.position.copy() for h in panels._marker or ()]
    panels.arm_click()
    bad = SimpleNamespace(origin=click.origin, direction=(0.0, 0.0, 0.0), screen_pos=click.screen_pos)
    server.scene._scene_pointer_cb(_click_event(bad, client))
    assert panels.status.startswith("click ignored: feature_at_ray needs a finite origin and a non-zero direction")
    assert torch.equal(model.feature_display.query, query)
    assert [h.position.tolist() for h in panels._marker or ()] == [p.tolist() for p in marker_at]

    # "Clear query" while a query output is shown: back to a valid output, and the status says so
    panel = viewer.control_panel
    panel.update_output_options(["rgb", "feature_pca", "similarity", "segmentation", "segmentation_overlay"])
    panel._output_render.value = "similarity"
    panels.controls["clear"].cb_hook(panels.controls["clear"])
    assert not bool(model.feature_display.has_query)
    assert panel._output_render.value == "feature_pca"
    assert panels.status == "cleared; Output type → feature_pca" and panels._marker is None


def test_a_click_during_training_waits_for_the_interrupted_render(running_viewer):
    """With a trainer (ns-train) the lookup itself runs under the lock, taken only after interrupting the render."""
    viewer, pipe = running_viewer
    model, panels = pipe.model, pipe.model.feature_panels
    real_lookup, seen = model.feature_at_ray, {}

    def lookup(*args, **kwargs):
        seen.update(interrupted=interrupted.is_set(), owner_is_me=viewer.train_lock.owner == threading.get_ident())
        return real_lookup(*args, **kwargs)

    lock = viewer.train_lock
    holder, interrupted = _render_holding_the_lock(viewer)
    viewer.trainer = SimpleNamespace(training_state="training")
    model.feature_at_ray = lookup
    click = _click_at(_camera(pipe, "features"), 6, 3)
    try:
        panels.arm_click()
        viewer.viser_server.scene._scene_pointer_cb(_click_event(click, None))
    finally:
        del model.feature_at_ray
        viewer.trainer = None
        interrupted.set()
        holder.join(10)
        viewer.train_lock = lock
        del viewer._trigger_rerender
    assert seen == {"interrupted": True, "owner_is_me": True}
    assert bool(model.feature_display.has_query)
    assert panels.status.startswith("point (")  # no browser client: no render size, normalised coordinates
