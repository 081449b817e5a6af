"""Viewer panels of the MVFM models: fixed PCA colours, click-to-query similarity and segmentation.

:class:`FeaturePanels` works with any Nerfstudio model that has

* ``feature_display``: a :class:`~mvfm_nerfstudio.features.FeatureDisplay` (display basis,
  query feature, threshold; turns a rendered ``feature`` into ``feature_pca`` and, with a
  query, the raw ``similarity`` ``[..., 1]`` / ``segmentation`` 0/1 ``[..., 1]``), and
* ``feature_at_ray(origin [3], direction [3], with_depth=True) -> ([D] feature, depth)``: the
  feature rendered along one ray in the model's world frame (the frame of
  ``Cameras.camera_to_worlds``) and the distance to the surface along the unit direction.

Integration (two lines in the model; :class:`~.feature_head.FeatureHeadMixin` does both)::

    def populate_modules(self):
        ...
        self.feature_panels = FeaturePanels(self, similarity_range=self.config.similarity_range)

    def get_outputs_for_camera(self, camera, obb_box=None):
        return self.feature_panels.after_render(super().get_outputs_for_camera(camera, obb_box=obb_box))

What the user sees: one folder **MVFM features** at the top of the viewer's Control tab (where
the viewer opens), made of :attr:`FeaturePanels.sections`:

* the query status line (``Query: pixel (256, 199) of 512×399``: the pixel of the full-resolution
  render at the viewer's *Max res*);
* **Click query**: *Pick query point* (the next click in the render casts the click's ray,
  renders its feature and makes it the query), *Segmentation threshold* (cosine, the same
  scale as the colours), the colour scale of ``similarity`` with the threshold marked, and
  *Clear query*;
* **PCA colours**: *Lock PCA colours* (on: one fixed basis, from the feature cache and saved in
  the checkpoint; off: refitted to every render) and *Refresh PCA from view* (refit once);
* **Text query** (only with text-space features, :meth:`FeaturePanels.enable_text`): a text box, *Find text*
  (encodes the phrase with the CLIP text tower; outputs ``relevancy`` and ``relevancy_segmentation``), the
  *Relevancy threshold* slider and *Clear text*.

Full-frame outputs (:meth:`FeaturePanels.after_render`) are 3-channel images, so Nerfstudio's
colour options (Colormap, Normalize, Min/Max, Invert) cannot change them; the panels hide or
disable those options while one of them is shown:

* ``similarity``: turbo colours of the cosine on the fixed range ``similarity_range``
  (default ``[-1, 1]``: blue = opposite, green = unrelated, red = the query), identical in every
  view and at every resolution (:func:`~mvfm_nerfstudio.features.heatmap_rgb`);
* ``segmentation``: the mask in :data:`~mvfm_nerfstudio.features.MASK_COLOR` on black;
* ``segmentation_overlay``: the mask tinted over ``rgb``;
* ``relevancy``: turbo colours of LERF's relevancy of the text query on the fixed range ``[0, 1]`` (0.5, green:
  the query ties with its strongest canonical negative; :mod:`mvfm_nerfstudio.text`);
* ``relevancy_segmentation``: ``relevancy >= threshold`` in the mask colour on black.
The raw cosine is ``cosine_similarity(outputs["feature"], feature_display.query)``.

Threads. The viewer renders on its own thread and holds its ``train_lock`` for a whole
render (tens of seconds on a CPU at Max res 512); ``ns-train`` holds it for every training
step. Nerfstudio wraps the callbacks of the elements it installs itself in that lock, so the
panels keep their elements where its element walk does not look (:attr:`FeaturePanels.controls`, a
dict, and :attr:`FeaturePanels.sections`, a list), install them themselves, and a click never
waits for a whole render:

1. the click is recorded at once: status text and a marker on the click's ray (viser scene);
2. the feature lookup runs without the lock where that is safe (``ns-viewer``: no trainer, the
   model stays in eval mode; lookups are read-only), otherwise it interrupts the running render
   (``Viewer._trigger_rerender``, effective within one ray chunk) and takes the lock;
3. the query is set under the lock, after the same interrupt (a NeRF frame is rendered in
   chunks: a query appearing between two chunks would give chunks with different outputs);
4. status and marker (now on the surface) are updated and the view re-renders.

:meth:`FeaturePanels.on_click` is a plain method taking a ``ViewerClick``, so a click can be
simulated without a browser.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import traceback
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerClick,
    ViewerControl,
    ViewerElement,
    ViewerSlider,
    ViewerText,
)
from torch import nn

from ..features import PCABasis, heatmap_rgb, overlay_mask
from ..text import DEFAULT_RELEVANCY_THRESHOLD, CLIPTextTower, TextQuery

__all__ = ["FeaturePanels", "PanelSection", "PanelText", "PANELS_TITLE", "QUERY_OUTPUTS", "TEXT_OUTPUTS",
           "COLOUR_OUTPUTS"]

PANELS_TITLE = "MVFM features"
"""Label of the panels' folder in the viewer."""
QUERY_OUTPUTS = ("similarity", "segmentation", "segmentation_overlay")
"""Outputs that exist only while a query is set."""
TEXT_OUTPUTS = ("relevancy", "relevancy_segmentation")
"""Outputs that exist only while a text query is set."""
COLOUR_OUTPUTS = ("feature_pca",) + QUERY_OUTPUTS + TEXT_OUTPUTS
"""The panels' 3-channel outputs: Nerfstudio's colour options do nothing for them, so they are hidden."""
MARKER_NAME = "/mvfm_query_point"
"""viser scene node of the query marker (a sphere, hidden by nearer surfaces like any scene object)."""
MARKER_LABEL_NAME = "/mvfm_query_label"
"""viser scene node of the marker's label ("query": an HTML overlay, so it shows even where the sphere is hidden)."""
MARKER_COLOR = (255, 0, 255)
"""Magenta: a colour neither turbo nor the mask colour uses."""
MARKER_ANGLE = 0.015
"""Marker radius / distance from the camera (radians): about 9 px in a 750 px tall view at 75 degrees."""
_PROVISIONAL_DISTANCE = 0.2
"""World units along the click's ray where the marker shows until the surface distance is known (on the ray,
so it is drawn at the clicked pixel; close to the camera, so the rendered depth does not hide it)."""
_TOP_ORDER = -1000.0
"""viser order of the panels' folder: before everything Nerfstudio adds (its orders count up from 0)."""


class PanelText:
    """A markdown block of the panels (status line, colour scale); keeps its text without a viewer.

    Args:
        text: markdown.
    """

    def __init__(self, text: str):
        self._text = text
        self.gui_handle = None

    @property
    def text(self) -> str:
        return self._text

    @text.setter
    def text(self, text: str) -> None:
        self._text = text
        if self.gui_handle is not None:
            self.gui_handle.content = text  # markdown updates run no callbacks (and take no lock)

    def install(self, viser_server) -> None:
        # image_root only silences viser's warning for data: URLs (nothing is read from it)
        self.gui_handle = viser_server.gui.add_markdown(self._text, image_root=Path(__file__).parent)


PanelItem = Union[ViewerElement, PanelText]


@dataclass
class PanelSection:
    """One block of the panels, in display order.

    Attributes:
        title: label of the section's sub-folder, or None to put the items directly into the
            panels' folder.
        items: ViewerElements (installed as they are: their ``cb_hook`` is *not* wrapped in the
            viewer's lock, see the module docstring) and :class:`PanelText` blocks.
    """

    title: Optional[str]
    items: List[PanelItem] = field(default_factory=list)


@dataclass
class _RayHit:
    feature: torch.Tensor  # [D]
    depth: float  # world units along the unit direction; nan when the ray hits nothing


class _PanelsControl(ViewerControl):
    """The panels' ViewerControl: the viewer's walk finds it and calls :meth:`_setup` once the viewer is built."""

    def __init__(self, panels: "FeaturePanels"):
        super().__init__()
        self._panels_ref = weakref.ref(panels)

    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        panels = self._panels_ref()
        if panels is None:
            return
        try:
            panels._install(viewer)
        except Exception as err:  # the viewer must keep working without the panels; say so loudly
            warnings.warn(f"MVFM viewer panels could not be installed ({err!r}):\n{traceback.format_exc()}",
                          stacklevel=2)


class FeaturePanels(nn.Module):
    """Viewer elements driving a model's ``feature_display`` (see the module docstring).

    Args:
        model: a model with ``feature_display`` and ``feature_at_ray`` (held by weak reference).
        overlay_alpha: opacity of the mask tint in ``segmentation_overlay``.
        similarity_range: cosine values at the two ends of the ``similarity`` colour scale.

    Attributes:
        sections: the panels' blocks in display order (:class:`PanelSection`); add one before the
            viewer starts (e.g. in ``populate_modules``) and it is installed with the others.
        controls: the built-in elements by role: ``pick``, ``threshold``, ``clear``, ``pca_lock``,
            ``pca_refresh``.
        viewer_control: the :class:`ViewerControl` through which the viewer hands itself over.
    """

    def __init__(self, model: nn.Module, overlay_alpha: float = 0.55,
                 similarity_range: Tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        missing = [a for a in ("feature_display", "feature_at_ray") if not hasattr(model, a)]
        if missing:
            raise TypeError(f"FeaturePanels needs a model with {missing} ({type(model).__name__} has none)")
        lo, hi = (float(v) for v in similarity_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(f"similarity_range must be (lo, hi) with lo < hi, got {tuple(similarity_range)}")
        # Underscore attributes are skipped by the viewer's element walk; a weakref is not a submodule.
        self._model_ref = weakref.ref(model)
        self._refit_pending = False
        self._marker = None  # (sphere, label) viser handles while a marker is shown
        self._text_query: Optional[TextQuery] = None  # the text query behind the relevancy outputs
        # in a dict: an nn.Module attribute would become a submodule, and the tower would go into checkpoints
        self._text_tower: Dict[str, CLIPTextTower] = {}
        self._make_text_tower: Optional[Callable[[], CLIPTextTower]] = None
        self._text_reduction: Optional[PCABasis] = None
        self.text_threshold = DEFAULT_RELEVANCY_THRESHOLD
        self._text_status: Optional[PanelText] = None
        self._text_status_text = "off (the features are not in CLIP's text space)"
        self._query_marker = None  # (origin, unit direction, distance) of the query's marker, to restore it
        self.overlay_alpha = overlay_alpha
        self.similarity_range = (lo, hi)
        display = model.feature_display
        self.viewer_control = _PanelsControl(self)
        # Dicts and lists are not walked by the viewer: these elements are installed by _install only.
        self.controls: Dict[str, ViewerElement] = {
            "pick": ViewerButton("Pick query point", cb_hook=lambda _: self.arm_click()),
            "threshold": ViewerSlider(
                "Segmentation threshold", float(display.threshold), -1.0, 1.0, 0.01,
                cb_hook=lambda element: self.set_threshold(element.value),
                hint="'segmentation' = cosine similarity to the query >= this (the scale of the colours below)",
            ),
            "clear": ViewerButton("Clear query", cb_hook=lambda _: self.clear_query()),
            "pca_lock": ViewerCheckbox(
                "Lock PCA colours", True, cb_hook=lambda _: self._rerender(),
                hint="Keep one fixed PCA basis for 'feature_pca' (off: refit to every render)",
            ),
            "pca_refresh": ViewerButton("Refresh PCA from view", cb_hook=lambda _: self.request_pca_refresh()),
        }
        self._status = PanelText("")
        self._scale = PanelText(self._scale_markdown())
        self._set_status("none")
        c = self.controls
        self.sections: List[PanelSection] = [
            PanelSection(None, [self._status]),
            PanelSection("Click query", [c["pick"], c["threshold"], self._scale, c["clear"]]),
            PanelSection("PCA colours", [c["pca_lock"], c["pca_refresh"]]),
        ]

    # ------------------------------------------------------------------------------------ helpers

    def _host(self) -> nn.Module:
        """The model (never a public attribute: the viewer's walk would recurse into it and loop)."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model these FeaturePanels belong to no longer exists")
        return model

    def _viewer(self):
        return getattr(self.viewer_control, "viewer", None)

    def _server(self):
        return getattr(self.viewer_control, "viser_server", None)

    @contextlib.contextmanager
    def render_exclusive(self) -> Iterator[None]:
        """Context manager for changes to what a render outputs (the query, say): holds the viewer's lock (renders
        and training steps hold it), taken after interrupting a running render so that it is free within one ray
        chunk. A no-op without a viewer."""
        viewer = self._viewer()
        if viewer is None:
            yield
            return
        self._rerender()
        lock = getattr(viewer, "train_lock", None)
        with lock if lock is not None else contextlib.nullcontext():
            yield

    def _lookup_needs_lock(self) -> bool:
        """A ray lookup may run beside a render only in ``ns-viewer``: no trainer steps the model, and the model
        is in eval mode, so neither the lookup's nor the render's eval()/train() switch changes anything."""
        viewer = self._viewer()
        if viewer is None:
            return False
        return getattr(viewer, "trainer", None) is not None or self._host().training

    def _rerender(self) -> None:
        viewer = self._viewer()
        if viewer is not None and hasattr(viewer, "_trigger_rerender"):
            viewer._trigger_rerender()

    @property
    def status(self) -> str:
        """The query status line (plain text)."""
        return self._status_text

    def _set_status(self, text: str) -> None:
        self._status_text = text
        self._status.text = f"**Query:** {text}"

    def _scale_markdown(self) -> str:
        """Markdown of the similarity colour scale (a PNG bar, data URL) with the threshold marked."""
        from PIL import Image

        lo, hi = self.similarity_range
        width, height = 256, 14
        values = torch.linspace(lo, hi, width, dtype=torch.float64)  # device: a CPU picture for the GUI
        bar = heatmap_rgb(values, lo, hi).mul(255).round().to(torch.uint8)[None].expand(height, width, 3).clone()
        threshold = float(self._host().feature_display.threshold)
        x = round((min(max(threshold, lo), hi) - lo) / (hi - lo) * (width - 1))
        bar[:, max(0, x - 2): x + 3] = 0  # a white line with black edges shows on every colour
        bar[:, max(0, x - 1): x + 2] = 255
        buf = io.BytesIO()
        Image.fromarray(bar.numpy()).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        return (f"**similarity** colours: cosine {lo:g} (blue) … {hi:g} (red)\n\n![colour scale]({url})\n\n"
                f"white line: threshold {threshold:.2f}")

    def _render_size(self, client=None) -> Optional[Tuple[int, int]]:
        """``(width, height)`` of the viewer's full-resolution render for ``client`` (the first client when None),
        as ``RenderStateMachine._calculate_image_res`` computes it for a still camera: Max res on the longer side."""
        viewer = self._viewer()
        try:
            if client is None:
                client = next(iter(viewer.viser_server.get_clients().values()))
            max_res, aspect = int(viewer.control_panel.max_res), float(client.camera.aspect)
        except (AttributeError, StopIteration, TypeError, ValueError):
            return None
        height, width = max_res, int(max_res * aspect)
        if width > max_res:
            width, height = max_res, int(max_res / aspect)
        return width, height

    @staticmethod
    def _where(click: ViewerClick, render_size: Optional[Tuple[int, int]]) -> str:
        x, y = (float(v) for v in click.screen_pos)
        if render_size is None:
            return f"point ({x:.2f}, {y:.2f}) of the render"
        w, h = render_size
        return f"pixel ({min(int(x * w), w - 1)}, {min(int(y * h), h - 1)}) of {w}×{h}"

    # ------------------------------------------------------------------------------------ marker

    def _show_marker(self, origin: torch.Tensor, direction: torch.Tensor, distance: float) -> None:
        """A sphere and a "query" label on the ray at ``distance`` (world units); the sphere is sized to look the
        same from the clicking camera whatever the distance."""
        server = self._server()
        if server is None:
            return
        from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

        radius = MARKER_ANGLE * distance
        # three radii in front of the surface: the rendered depth the viewer composites with is coarse (a
        # low-resolution image), and on the ray the marker still covers the clicked pixel
        centre = (origin + (distance - 3 * radius) * direction) * VISER_NERFSTUDIO_SCALE_RATIO
        position = tuple(float(v) for v in centre)
        sphere = server.scene.add_icosphere(MARKER_NAME, radius=radius * VISER_NERFSTUDIO_SCALE_RATIO,
                                            color=MARKER_COLOR, position=position)
        label = server.scene.add_label(MARKER_LABEL_NAME, "query", position=position)
        self._marker = (sphere, label)

    def _remove_marker(self) -> None:
        marker, self._marker = self._marker, None
        for handle in marker or ():
            handle.remove()

    def _restore_marker(self) -> None:
        """Show the current query's marker again (after a click that did not replace the query), or none."""
        self._remove_marker()
        if self._query_marker is not None and bool(self._host().feature_display.has_query):
            self._show_marker(*self._query_marker)

    # ------------------------------------------------------------------------------------ PCA display

    def request_pca_refresh(self) -> None:
        """Refit the display basis from the next full-frame render (see :meth:`after_render`)."""
        self._refit_pending = True
        self._rerender()

    @torch.no_grad()
    def after_render(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Post-process a full-frame render (``get_outputs_for_camera``) in place and return it.

        Refits the display basis to ``outputs["feature"]`` ``[H, W, D]`` when a refresh is pending
        or the colours are unlocked (and recomputes ``feature_pca`` with it). With a query, turns the
        raw ``similarity`` ``[H, W, 1]`` into its fixed-scale colours ``[H, W, 3]`` and
        ``segmentation`` into the mask image ``[H, W, 3]``, and adds ``segmentation_overlay``
        ``[H, W, 3]`` (see the module docstring).
        """
        display = self._host().feature_display
        feature = outputs.get("feature")
        if feature is not None and (self._refit_pending or not bool(self.controls["pca_lock"].value)):
            display.fit_basis(feature.detach())
            outputs["feature_pca"] = display.basis.to_rgb(feature.detach())
            self._refit_pending = False
        if bool(display.has_query) and self.status == "none":  # loaded with a checkpoint
            self._set_status("set (from the checkpoint)")
        similarity, mask = outputs.get("similarity"), outputs.get("segmentation")
        if similarity is not None and mask is not None and similarity.shape[-1] == 1:
            outputs["similarity"] = heatmap_rgb(similarity[..., 0], *self.similarity_range)
            outputs["segmentation"] = overlay_mask(mask.new_zeros(*mask.shape[:-1], 3), mask, alpha=1.0)
            if "rgb" in outputs:
                outputs["segmentation_overlay"] = overlay_mask(outputs["rgb"], mask, self.overlay_alpha)
        if self._text_query is not None and feature is not None:
            outputs.update(self._text_outputs(feature))
        return outputs

    # ------------------------------------------------------------------------------------ query

    def set_threshold(self, value: float) -> None:
        """Set the segmentation threshold (cosine) and mark it on the colour scale. No lock: a render that is
        running may use the old value in some ray chunks; the re-render that follows uses the new one."""
        self._host().feature_display.threshold = float(value)
        self._scale.text = self._scale_markdown()
        self._rerender()

    def clear_query(self) -> None:
        """Remove the query: its outputs disappear from the next render. If the viewer shows one of them, it
        switches to ``feature_pca`` (or ``rgb``) and the status says so."""
        self._remove_marker()
        self._query_marker = None
        with self.render_exclusive():
            self._host().feature_display.set_query(None)
        shown = self._leave_query_output(QUERY_OUTPUTS)
        self._set_status("none" if shown is None else f"cleared; Output type → {shown}")
        self._rerender()

    def _leave_query_output(self, outputs: Tuple[str, ...]) -> Optional[str]:
        """If the viewer's Output type is one of ``outputs`` (a query's), switch it to ``feature_pca`` (``rgb`` if
        absent) and return the new one. (Nerfstudio would otherwise fall back to its first output without a word,
        leaving the colour options of the old output.)"""
        viewer = self._viewer()
        dropdown = getattr(getattr(viewer, "control_panel", None), "_output_render", None)
        if dropdown is None or dropdown.value not in outputs:
            return None
        options = list(getattr(dropdown.gui_handle, "options", ()) or ())
        target = next((o for o in ("feature_pca", "rgb") if o in options), None)
        if target is None:
            return None
        dropdown.value = target  # viser's setter runs the dropdown's callbacks (colour options, re-render)
        return target

    def _lookup(self, click: ViewerClick) -> Optional[_RayHit]:
        origin = torch.as_tensor(click.origin, dtype=torch.float32)
        direction = torch.as_tensor(click.direction, dtype=torch.float32)
        try:
            feature, depth = self._host().feature_at_ray(origin, direction, with_depth=True)
        except ValueError as err:
            self._set_status(f"click ignored: {err}")
            return None
        if not bool(torch.isfinite(feature).all()):
            self._set_status("click ignored: the feature along that ray is not finite")
            return None
        return _RayHit(feature, float(depth))

    @torch.no_grad()
    def on_click(self, click: ViewerClick, render_size: Optional[Tuple[int, int]] = None) -> Optional[torch.Tensor]:
        """Make the feature along the click's ray the query.

        Args:
            click: ``origin`` in the model's world frame (Nerfstudio divides the viser coordinates by
                ``VISER_NERFSTUDIO_SCALE_RATIO``), ``direction`` in world axes, ``screen_pos`` in [0, 1]
                (``(0, 0)`` = top-left of the render).
            render_size: ``(width, height)`` of the render, for the pixel in the status text.

        Returns:
            The ``[D]`` query feature, or None if the ray could not be rendered (the status text says
            why; the previous query is kept).
        """
        where = self._where(click, render_size)
        if self._lookup_needs_lock():  # ns-train: the lookup itself must not run beside a training step
            with self.render_exclusive():
                hit = self._lookup(click)
                if hit is not None:
                    self._host().feature_display.set_query(hit.feature)
        else:
            hit = self._lookup(click)
            if hit is not None:
                with self.render_exclusive():
                    self._host().feature_display.set_query(hit.feature)
        if hit is None:
            self._restore_marker()
            return None
        self._set_status(where)
        direction = torch.as_tensor(click.direction, dtype=torch.float32)
        self._query_marker = None
        if math.isfinite(hit.depth) and hit.depth > 0:  # else the ray hits nothing: no marker
            self._query_marker = (torch.as_tensor(click.origin, dtype=torch.float32), direction / direction.norm(),
                                  hit.depth)
        self._restore_marker()
        return hit.feature

    def arm_click(self) -> None:
        """Route the next click in the render to :meth:`on_click` (needs a running viewer)."""
        server = self._server()
        if server is None:
            self._set_status("no viewer: clicks need ns-viewer / ns-train with the viewer")
            return
        # register first: replacing an earlier registration runs its removed-callback (re-enabling the button)
        server.scene.on_pointer_event(event_type="click")(self._pointer_event)
        server.scene.on_pointer_callback_removed(self._click_disarmed)
        if self.controls["pick"].gui_handle is not None:
            self.controls["pick"].set_disabled(True)
        self._set_status("click a point in the render")

    def _pointer_event(self, event) -> None:
        """viser's click callback (on viser's thread pool): one pick per press, feedback first."""
        from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

        self._server().scene.remove_pointer_callback()  # also runs _click_disarmed
        try:
            click = ViewerClick(tuple(float(v) / VISER_NERFSTUDIO_SCALE_RATIO for v in event.ray_origin),
                                tuple(float(v) for v in event.ray_direction), tuple(event.screen_pos[0]))
            size = self._render_size(event.client)
            self._set_status(f"picking {self._where(click, size)} …")
            origin = torch.as_tensor(click.origin, dtype=torch.float32)
            direction = torch.as_tensor(click.direction, dtype=torch.float32)
            if bool(direction.norm() > 0):
                self._show_marker(origin, direction / direction.norm(), _PROVISIONAL_DISTANCE)
            self.on_click(click, render_size=size)
        except Exception as err:  # viser drops callback exceptions silently: show it
            self._set_status(f"click failed: {err!r}")
            traceback.print_exc()
        self._rerender()

    def _click_disarmed(self) -> None:
        if self.controls["pick"].gui_handle is not None:
            self.controls["pick"].set_disabled(False)

    # ------------------------------------------------------------------------------------ text query

    def enable_text(self, make_tower: Callable[[], CLIPTextTower], reduction: Optional[PCABasis] = None,
                    threshold: float = DEFAULT_RELEVANCY_THRESHOLD) -> None:
        """Add the **Text query** section (call before the viewer starts, e.g. in ``populate_modules``).

        Args:
            make_tower: builds the CLIP text tower matching the model's features (called on the first query, so
                a viewer without text queries never loads it; its errors show in the section's status).
            reduction: the PCA basis the cached (and so the rendered) features were reduced with, or None.
            threshold: initial relevancy threshold of ``relevancy_segmentation``.
        """
        self._make_text_tower, self._text_reduction = make_tower, reduction
        self.text_threshold = float(threshold)
        self.controls.update({
            "text": ViewerText("Text query", "", hint="a phrase, e.g. 'red mug'; then press Find text"),
            "text_find": ViewerButton("Find text", cb_hook=lambda _: self.set_text(self.controls["text"].value)),
            "text_threshold": ViewerSlider(
                "Relevancy threshold", self.text_threshold, 0.0, 1.0, 0.01,
                cb_hook=lambda element: self.set_text_threshold(element.value),
                hint="'relevancy_segmentation' = relevancy >= this (0.5: the query beats every canonical negative)",
            ),
            "text_clear": ViewerButton("Clear text", cb_hook=lambda _: self.clear_text()),
        })
        self._text_status = PanelText("")
        self._set_text_status("none")
        c = self.controls
        self.sections.insert(2, PanelSection("Text query", [self._text_status, c["text"], c["text_find"],
                                                            c["text_threshold"], c["text_clear"]]))

    @property
    def text_status(self) -> str:
        """The text query's status line (plain text)."""
        return self._text_status_text

    def _set_text_status(self, text: str) -> None:
        self._text_status_text = text
        self._text_status.text = f"**Text:** {text}"

    @property
    def text_query(self) -> Optional[TextQuery]:
        return self._text_query

    def set_text(self, text: str) -> Optional[TextQuery]:
        """Make ``text`` the text query (encoded with the text tower); '' clears it. Returns the query, or None
        when it could not be encoded (the status says why; the previous query is kept)."""
        if self._make_text_tower is None:
            raise RuntimeError("text queries are off: the model's features are not in CLIP's text space")
        if not text.strip():
            self.clear_text()
            return None
        self._set_text_status(f"encoding '{text}' …")
        try:
            if "tower" not in self._text_tower:
                self._text_tower["tower"] = self._make_text_tower()
            query = TextQuery.encode(self._text_tower["tower"], text)
        except Exception as err:  # weights unavailable, ...: show it, keep the viewer running
            self._set_text_status(f"text query failed: {err}")
            return None
        with self.render_exclusive():
            self._text_query = query
        self._set_text_status(f"'{text}' (Output type: relevancy, relevancy_segmentation)")
        self._rerender()
        return query

    def set_text_threshold(self, value: float) -> None:
        """Set the relevancy threshold of ``relevancy_segmentation``."""
        self.text_threshold = float(value)
        self._rerender()

    def clear_text(self) -> None:
        """Remove the text query (its outputs disappear; a shown one switches to ``feature_pca``)."""
        with self.render_exclusive():
            self._text_query = None
        shown = self._leave_query_output(TEXT_OUTPUTS)
        self._set_text_status("none" if shown is None else f"cleared; Output type → {shown}")
        self._rerender()

    def _text_outputs(self, feature: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``relevancy`` / ``relevancy_segmentation`` images ``[H, W, 3]`` of a rendered ``feature [H, W, D]``."""
        relevancy = self._text_query.relevancy(feature.detach(), self._text_reduction)
        mask = relevancy >= self.text_threshold
        return {"relevancy": heatmap_rgb(relevancy, 0.0, 1.0),
                "relevancy_segmentation": overlay_mask(relevancy.new_zeros(*relevancy.shape, 3), mask, alpha=1.0)}

    # ------------------------------------------------------------------------------------ viewer set-up

    def _install(self, viewer) -> None:
        """Build the panels' folder in ``viewer`` (called once by :class:`_PanelsControl`)."""
        server = viewer.viser_server
        gui = server.gui
        tab = _control_tab(gui)
        with tab if tab is not None else contextlib.nullcontext():
            # in the Control tab: first; without it (see _control_tab): first in the panel, above the tabs
            folder = gui.add_folder(PANELS_TITLE, order=_TOP_ORDER)
        with folder:
            for section in self.sections:
                with gui.add_folder(section.title) if section.title else contextlib.nullcontext():
                    for item in section.items:
                        item.install(server)
        _hide_colour_options_for(viewer, COLOUR_OUTPUTS)

    def detach_viewer(self) -> None:
        """Forget the viewer and the GUI handles (after the viewer stopped; the panels then work offline)."""
        for section in self.sections:
            for item in section.items:
                item.gui_handle = None
        self._marker = None
        self.viewer_control = _PanelsControl(self)


def _control_tab(gui) -> Any:
    """viser's "Control" tab, where Nerfstudio's viewer opens, or None (with a warning) if this viser version
    does not expose it as 0.2.7 does. viser has no public way to find a tab it did not create, so this reads
    the private container registry."""
    try:
        import viser

        root = gui._container_handle_from_id["root"]
        groups = [h for h in root._children.values() if isinstance(h, viser.GuiTabGroupHandle)]
        group = groups[0]
        return group._tabs[group._labels.index("Control")]
    except Exception as err:  # any change of viser's internals: degrade to the public API
        warnings.warn(f"MVFM viewer panels: viser's Control tab not found ({err!r}); the panels go above the tabs",
                      stacklevel=2)
        return None


def _hide_colour_options_for(viewer, outputs: Tuple[str, ...]) -> None:
    """Make Nerfstudio's control panel hide Invert/Normalize/Min/Max and disable Colormap while one of
    ``outputs`` (3-channel images, which its colour options leave unchanged) is shown, as it does for ``rgb``.

    Nerfstudio decides this in ``ControlPanel.update_control_panel`` (run whenever the output type or the
    output list changes); the panel's own instance gets a wrapper that applies the same rule to ``outputs``.
    Warns and changes nothing if this Nerfstudio version's control panel looks different.
    """
    panel = getattr(viewer, "control_panel", None)
    needed = ("update_control_panel", "_colormap", "_split_colormap", "_elements_by_tag", "output_render",
              "split_output_render", "_split")
    if panel is None or not all(hasattr(panel, a) for a in needed):
        warnings.warn("MVFM viewer panels: Nerfstudio's control panel has changed; its colour options stay visible "
                      "for the panels' outputs (they have no effect there)", stacklevel=2)
        return
    original = panel.update_control_panel

    def update_control_panel() -> None:
        original()
        if panel.output_render in outputs:
            panel._colormap.set_disabled(True)
            for e in panel._elements_by_tag["colormap"]:
                e.set_hidden(True)
        if panel._split.value and panel.split_output_render in outputs:
            panel._split_colormap.set_disabled(True)
            for e in panel._elements_by_tag["split_colormap"]:
                e.set_hidden(True)

    panel.update_control_panel = update_control_panel
    update_control_panel()
