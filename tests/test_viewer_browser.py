"""The MVFM viewer panels as a user meets them: ``ns-viewer`` on a tiny trained run, driven in Chromium.

Launches Debian's Chromium (``/usr/lib/chromium/chromium``, or ``$MVFM_CHROMIUM``) through Playwright's
Python package (no browser download: ``executable_path``), WebGL through SwiftShader. Checks what a user
sees: the "MVFM features" panels above Nerfstudio's controls, Nerfstudio's colour options hidden for the
panels' colour outputs, "Pick query point" then a click in the render (status with the pixel, a marker),
``similarity`` in *Output type* rendering the fixed-scale colour map, and "Clear query" leaving the query
outputs with a word in the status. Screenshots go to the test's tmp dir (printed), or to
``$MVFM_BROWSER_ARTIFACTS`` when set; so do the measured times (``timings.json``).

Skips with a message when Chromium or Playwright is missing (CI installs both: ``.ci/run``, README set-up).

The screenshots in docs/viewer_and_segmentation.md come from this test on the README quick start's run
(``mvfm-demo --weights random``): ``MVFM_BROWSER_CONFIG=<run>/config.yml MVFM_BROWSER_MAX_RES=256
MVFM_BROWSER_ARTIFACTS=/tmp/shots pytest -s tests/test_viewer_browser.py``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("MVFM_CHROMIUM", "/usr/lib/chromium/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-quic", "--disable-dev-shm-usage",
]
MAX_RES = int(os.environ.get("MVFM_BROWSER_MAX_RES", "96"))
"""The viewer's Max res for the test: CPU renders of the tiny NeRF stay ~1 s."""
RUN_CONFIG = os.environ.get("MVFM_BROWSER_CONFIG")
"""A trained run's config.yml to open instead of training the tiny run (the docs' screenshots: ``mvfm-demo``'s)."""
FEEDBACK_TIMEOUT_MS = 30_000
"""Generous limits for a loaded 2-core machine; the measured times are reported, not asserted."""


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (install Debian's 'chromium' package or set MVFM_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; the README set-up command does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 3-step mvfm-features run (tiny random backbone), or ``$MVFM_BROWSER_CONFIG``. A 3-step feature field is
    still flat, so its feature field gets random values in the checkpoint (hash grid as in test_viewer_panels, and
    the MLP): the similarity map varies."""
    if RUN_CONFIG:
        return Path(RUN_CONFIG)
    from test_plugin_features import _tiny_config

    from mvfm_nerfstudio.data.generator import make_scene, tiny_config

    root = tmp_path_factory.mktemp("browser")
    scene = make_scene(tiny_config(seed=0), root / "scene", progress=False)
    config = _tiny_config(scene, root / "runs", root / "feature_cache")
    config.set_timestamp()
    config.save_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from nerfstudio.scripts.train import train_loop

        train_loop(local_rank=0, world_size=1, config=config)  # ns-train's own loop (seeded)
    finally:
        torch.set_num_threads(threads)
    (ckpt,) = sorted((config.get_base_dir() / "nerfstudio_models").glob("step-*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    field = {k: v for k, v in state["pipeline"].items() if k.startswith("_model.feature_field.")}
    assert any(k.startswith("_model.feature_field.encoding.") for k in field)
    for k, v in field.items():
        # hash grid ~ N(0, 1); MLP weights He-scaled, biases zero, so the features (and the similarity to the
        # clicked one) follow the position, not a shared bias, whatever the 3 training steps left
        if ".encoding." in k:
            state["pipeline"][k] = torch.randn(v.shape, generator=g)
        elif v.ndim == 2:
            state["pipeline"][k] = torch.randn(v.shape, generator=g) * (2.0 / v.shape[1]) ** 0.5
        elif v.is_floating_point():
            state["pipeline"][k] = torch.zeros_like(v)
    torch.save(state, ckpt)
    return config.get_base_dir() / "config.yml"


@pytest.fixture(scope="module")
def viewer_url(trained_run, tmp_path_factory):
    from test_plugin_features import _ns_viewer

    log = tmp_path_factory.mktemp("viewer_log") / "viewer.log"
    with _ns_viewer(trained_run, log) as (url, _):
        yield url, log
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def _row_input(page, label: str):
    """The <input> of the viser GUI row labelled ``label`` (viser's label ``for=`` does not match the input id
    for text/number inputs, so Playwright's get_by_label does not find them)."""
    return page.locator(f"xpath=//label[normalize-space()='{label}']/ancestor::div"
                        "[contains(@class,'mantine-Flex-root')][1]//input[not(@type='hidden')]").first


def _resolution(page) -> str:
    return page.evaluate("() => (document.body.innerText.match(/Resolution: (\\d+x\\d+)px/) || [])[1] || ''")


def _canvas_rgb(canvas) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(np.float32)


def _turbo_fit(rgb: np.ndarray):
    """For every pixel, the distance to the nearest turbo colour (0-255 units) and that colour's index."""
    import matplotlib

    lut = np.asarray(matplotlib.colormaps["turbo"].colors, np.float32) * 255  # [256, 3]
    flat = rgb.reshape(-1, 3)
    d = ((flat[:, None, :] - lut[None]) ** 2).sum(-1)  # [N, 256]
    index = d.argmin(1)
    return np.sqrt(d[np.arange(len(flat)), index]), index


TURBO_DISTANCE = 30.0
"""A still 'similarity' frame here: median distance 20 (0-255 RGB units) to the nearest turbo colour; feature_pca: 89."""


def _centre(rgb: np.ndarray) -> np.ndarray:
    """The middle 60 % of an image, every 4th pixel."""
    h, w = rgb.shape[:2]
    return rgb[int(0.2 * h): int(0.8 * h): 4, int(0.2 * w): int(0.8 * w): 4]


def _select_output(page, name: str) -> None:
    from playwright.sync_api import expect

    out = page.get_by_label("Output type")
    out.click()
    page.get_by_role("option", name=name, exact=True).click()
    expect(out).to_have_value(name)


def _static_size(canvas) -> str:
    """``WxH`` of the viewer's render of a still camera: Max res on the longer side, the canvas's aspect ratio."""
    box = canvas.bounding_box()
    aspect = box["width"] / box["height"]
    h, w = MAX_RES, int(MAX_RES * aspect)
    if w > MAX_RES:
        w, h = MAX_RES, int(MAX_RES / aspect)
    return f"{w}x{h}"


def _wait_full_render(page, canvas, settle_ms: int = 1500) -> np.ndarray:
    """Canvas pixels once the full-resolution render is shown. A re-render shows low-resolution frames first
    (in well under ``settle_ms`` here), so waiting that long before looking skips the previous full frame."""
    page.wait_for_timeout(settle_ms)
    size = _static_size(canvas)
    page.wait_for_function(f"() => document.body.innerText.includes('Resolution: {size}px')", timeout=120_000)
    page.wait_for_timeout(300)  # the image message lands before the stats text; let the canvas draw it
    return _canvas_rgb(canvas)


def _go_to_a_training_camera(page, canvas) -> None:
    """Click the training-camera frustum nearest the middle of the view, as a user would to see the scene as it
    was captured (the viewer flies there), then hide the frustums. They are found as the pixels that change
    when the viewer's "Hide Train Cams" hides them."""
    _wait_full_render(page, canvas, settle_ms=0)
    shown = _canvas_rgb(canvas)
    page.get_by_role("button", name="Hide Train Cams").click()
    page.wait_for_timeout(500)
    hidden = _canvas_rgb(canvas)
    page.get_by_role("button", name="Show Train Cams").click()
    page.wait_for_timeout(500)
    ys, xs = np.nonzero(np.abs(shown - hidden).sum(-1) > 60)
    assert len(xs) > 0, "no training-camera frustums in the view"
    h, w = shown.shape[:2]
    i = int(np.argmin((xs - w / 2) ** 2 + (ys - h / 2) ** 2))
    canvas.click(position={"x": float(xs[i]), "y": float(ys[i])})
    page.wait_for_timeout(2000)  # the camera flies to the frustum
    page.get_by_role("button", name="Hide Train Cams").click()


def test_panels_in_chromium(browser, viewer_url, tmp_path):
    from playwright.sync_api import expect

    url, log = viewer_url
    artifacts = Path(os.environ.get("MVFM_BROWSER_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    times = {}
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        page.goto(url)
        page.get_by_text("Connected", exact=True).wait_for(timeout=60_000)
        page.get_by_role("tab", name="Control").click()
        page.wait_for_function("() => /Resolution: (?!0x0px)\\d+x\\d+px/.test(document.body.innerText)",
                               timeout=120_000)

        # -- the panels: a human title at the top of the Control tab, labels as in the docs, no code-named folders
        title = page.get_by_text("MVFM features", exact=True)
        expect(title).to_be_visible()
        assert title.bounding_box()["y"] < page.get_by_text("Render Options", exact=True).bounding_box()["y"]
        assert page.get_by_text("Custom Elements", exact=True).count() == 0
        assert page.get_by_text("feature_panels", exact=True).count() == 0
        for label in ("Pick query point", "Clear query", "Refresh PCA from view"):
            expect(page.get_by_role("button", name=label, exact=True)).to_be_visible()
        for label in ("Click query", "PCA colours", "Lock PCA colours", "Segmentation threshold"):
            expect(page.get_by_text(label, exact=True)).to_be_visible()
        status = page.get_by_text(re.compile(r"^Query: "))
        expect(status).to_have_text("Query: none")
        expect(page.get_by_role("img", name="colour scale")).to_be_visible()

        max_res = _row_input(page, "Max res")
        max_res.fill(str(MAX_RES))
        max_res.press("Enter")
        canvas = page.locator('canvas[data-engine^="three.js"]')
        box = canvas.bounding_box()
        _go_to_a_training_camera(page, canvas)

        # -- feature_pca: colour options that do nothing are hidden/disabled; Refresh PCA recolours the view
        _select_output(page, "feature_pca")
        expect(_row_input(page, "Colormap")).to_be_disabled()
        expect(page.get_by_text("Normalize", exact=True)).to_be_hidden()
        expect(page.get_by_text("Invert", exact=True)).to_be_hidden()
        cache_basis = _wait_full_render(page, canvas)
        page.get_by_role("button", name="Refresh PCA from view", exact=True).click()
        pca = _wait_full_render(page, canvas)
        times["pca_refresh_change"] = float(np.abs(pca - cache_basis).mean())
        assert times["pca_refresh_change"] > 2, "Refresh PCA from view did not change the colours"
        title.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "viewer_feature_pca.png"))

        # -- pick, then click the middle of the render
        t = time.monotonic()
        page.get_by_role("button", name="Pick query point", exact=True).click()
        expect(status).to_have_text("Query: click a point in the render", timeout=FEEDBACK_TIMEOUT_MS)
        times["pick_to_armed_s"] = time.monotonic() - t
        cx, cy = box["width"] * 0.5, box["height"] * 0.5
        t = time.monotonic()
        canvas.click(position={"x": cx, "y": cy})
        expect(status).to_have_text(re.compile(r"^Query: (picking )?pixel \(\d+, \d+\) of \d+×\d+"),
                                    timeout=FEEDBACK_TIMEOUT_MS)
        times["click_to_status_s"] = time.monotonic() - t
        expect(status).to_have_text(re.compile(r"^Query: pixel \(\d+, \d+\) of \d+×\d+$"), timeout=FEEDBACK_TIMEOUT_MS)
        times["click_to_query_set_s"] = time.monotonic() - t
        col, row, w, h = map(int, re.findall(r"\d+", status.inner_text()))
        assert max(w, h) == MAX_RES  # the pixel of the full-resolution render (checked against it below)
        assert abs(col - w // 2) <= 1 and abs(row - h // 2) <= 1  # the middle of the render

        # -- similarity appears in Output type and renders the fixed-scale colour map
        out = page.get_by_label("Output type")
        deadline = time.monotonic() + FEEDBACK_TIMEOUT_MS / 1000
        while True:
            out.click()
            names = [o.inner_text() for o in page.get_by_role("option").all()]
            page.keyboard.press("Escape")
            if "similarity" in names or time.monotonic() > deadline:
                break
            page.wait_for_timeout(250)
        assert {"similarity", "segmentation", "segmentation_overlay"} <= set(names), names
        _select_output(page, "similarity")
        deadline = time.monotonic() + 60
        while True:  # the first frame whose colours lie on the turbo curve (JPEG and upscaling blur them a little)
            dist, index = _turbo_fit(_centre(_canvas_rgb(canvas)))
            if np.median(dist) < TURBO_DISTANCE or time.monotonic() > deadline:
                break
            page.wait_for_timeout(200)
        times["click_to_similarity_image_s"] = time.monotonic() - t
        pca_dist, _ = _turbo_fit(_centre(pca))
        times["median_turbo_distance_similarity"] = float(np.median(dist))
        times["median_turbo_distance_pca"] = float(np.median(pca_dist))
        assert np.median(pca_dist) > 2 * TURBO_DISTANCE, "the turbo-colour test does not tell feature_pca apart"
        assert np.median(dist) < TURBO_DISTANCE, "the similarity output is not a turbo colour map"
        lo, hi = np.percentile(index[dist < TURBO_DISTANCE], [5, 95])
        assert hi - lo >= 20, f"flat similarity map (turbo indices {lo}..{hi})"
        expect(_row_input(page, "Colormap")).to_be_disabled()
        expect(page.get_by_text("Normalize", exact=True)).to_be_hidden()
        # the marker: its "query" label at the clicked point (an overlay: shown even where the sphere is hidden)
        label = page.get_by_text("query", exact=True)
        expect(label).to_be_visible()
        lb, cb = label.bounding_box(), canvas.bounding_box()
        assert abs(lb["x"] - (cb["x"] + cx)) < 30 and abs(lb["y"] + lb["height"] / 2 - (cb["y"] + cy)) < 30, lb
        # ... and the magenta sphere there (without "Composite depth", which lets the coarse rendered depth hide it)
        composite = _row_input(page, "Composite depth")
        composite.uncheck()
        sim = _wait_full_render(page, canvas)
        assert _resolution(page) == f"{w}x{h}"  # the status's render size is the still render's
        ys, xs = np.mgrid[0: sim.shape[0], 0: sim.shape[1]]
        near = (np.abs(xs - cx) < 30) & (np.abs(ys - cy) < 30)
        magenta = (sim[..., 0] > 180) & (sim[..., 1] < 90) & (sim[..., 2] > 180)
        assert magenta[near].sum() >= 5 and magenta[~near].sum() < 5, "no query marker at the click"
        composite.check()
        _wait_full_render(page, canvas)
        title.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "viewer_similarity.png"))

        # -- Clear query while 'similarity' is shown: a valid output, and the status says which
        t = time.monotonic()
        page.get_by_role("button", name="Clear query", exact=True).click()
        expect(status).to_have_text("Query: cleared; Output type → feature_pca", timeout=FEEDBACK_TIMEOUT_MS)
        times["clear_to_status_s"] = time.monotonic() - t
        expect(out).to_have_value("feature_pca", timeout=FEEDBACK_TIMEOUT_MS)
        expect(_row_input(page, "Colormap")).to_be_disabled()
        page.screenshot(path=str(artifacts / "viewer_cleared.png"))
    finally:
        page.screenshot(path=str(artifacts / "viewer_last.png"))
        page.close()
        (artifacts / "timings.json").write_text(json.dumps({k: round(v, 3) for k, v in times.items()}, indent=2))
        print(f"\nbrowser test artifacts (screenshots, timings.json): {artifacts}\ntimes: {times}")
        shutil.copy(log, artifacts / "viewer.log")
