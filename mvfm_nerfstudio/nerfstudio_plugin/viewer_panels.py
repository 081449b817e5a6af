"""Viewer panels of the MVFM models: fixed PCA colours, click-to-query similarity and segmentation.

:class:`FeaturePanels` works with any Nerfstudio model that has

* ``feature_display``: a :class:`~mvfm_nerfstudio.features.FeatureDisplay` (display basis,
  query feature, threshold; turns a rendered ``feature`` into ``feature_pca`` and, with a
  query, ``similarity``/``segmentation``), and
* ``feature_at_ray(origin [3], direction [3]) -> [D]``: the feature rendered along one ray in
  the model's world frame (the frame of ``Cameras.camera_to_worlds``).

Integration (two lines in the model)::

    def populate_modules(self):
        ...
        self.feature_panels = FeaturePanels(self)

    def get_outputs_for_camera(self, camera, obb_box=None):
        return self.feature_panels.after_render(super().get_outputs_for_camera(camera, obb_box=obb_box))

How Nerfstudio finds the elements: the viewer walks the pipeline's public attributes and
recurses into ``nn.Module`` attributes (``nerfstudio.viewer.utils.parse_object``), collecting
``ViewerElement`` and ``ViewerControl`` instances. :class:`FeaturePanels` is therefore an
``nn.Module`` (without parameters or buffers: checkpoints are unchanged) held as a model
attribute; its elements appear under "Custom Elements / model / feature_panels", sorted by
attribute name. It keeps only a weak, underscore-named reference to the model, so neither
``Module.modules()`` nor the viewer's walk ever loops.

Controls:

* **Lock PCA colours** (checkbox, on): ``feature_pca`` uses one fixed basis (from the feature
  cache, saved in the checkpoint), so colours do not flicker. Off: the basis is refitted to
  every full-frame render (colours follow the view; deterministic for a given view).
* **Refresh PCA from view** (button): refit the basis once from the next full-frame render
  (the viewer re-renders immediately), then keep it.
* **Pick query point** (button): the next click in the render casts the click's ray,
  renders its feature with ``model.feature_at_ray`` and makes it the query
  (``feature_display.set_query``): ``similarity`` (cosine, ``[..., 1]``), ``segmentation``
  (``similarity >= threshold``) and ``segmentation_overlay`` (the mask tinted over ``rgb``)
  appear in the "Output type" dropdown. One pick per press, so clicks and drags keep moving
  the camera otherwise.
* **Segmentation threshold** (slider, cosine in [-1, 1]): ``feature_display.threshold``.
* **Clear query** (button): removes the query and its outputs.
* **Query** (read-only text): the query's status.

:meth:`FeaturePanels.on_click` is a plain method taking a ``ViewerClick``, so a click can be
simulated without a browser.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Dict, Optional

import torch
from nerfstudio.viewer.viewer_elements import (
    ViewerButton,
    ViewerCheckbox,
    ViewerClick,
    ViewerControl,
    ViewerSlider,
    ViewerText,
)
from torch import nn

from ..features import overlay_mask

__all__ = ["FeaturePanels"]


class FeaturePanels(nn.Module):
    """Viewer elements driving a model's ``feature_display`` (see the module docstring).

    Args:
        model: a model with ``feature_display`` and ``feature_at_ray`` (held by weak reference).
        overlay_alpha: opacity of the mask tint in ``segmentation_overlay``.
    """

    def __init__(self, model: nn.Module, overlay_alpha: float = 0.55):
        super().__init__()
        missing = [a for a in ("feature_display", "feature_at_ray") if not hasattr(model, a)]
        if missing:
            raise TypeError(f"FeaturePanels needs a model with {missing} ({type(model).__name__} has none)")
        # Underscore attributes are skipped by the viewer's element walk; a weakref is not a submodule.
        self._model_ref = weakref.ref(model)
        self._refit_pending = False
        self.overlay_alpha = overlay_alpha
        display = model.feature_display
        self.viewer_control = ViewerControl()
        self.pca_lock = ViewerCheckbox(
            "Lock PCA colours", True, hint="Keep one fixed PCA basis for 'feature_pca' (off: refit to every render)"
        )
        self.pca_refresh = ViewerButton("Refresh PCA from view", cb_hook=lambda _: self.request_pca_refresh())
        self.query_pick = ViewerButton("Pick query point (click in render)", cb_hook=lambda _: self.arm_click())
        self.query_status = ViewerText("Query", "none", disabled=True, hint="The query feature behind 'similarity'")
        self.query_threshold = ViewerSlider(
            "Segmentation threshold", float(display.threshold), -1.0, 1.0, 0.01,
            cb_hook=lambda element: self.set_threshold(element.value),
            hint="'segmentation' = cosine similarity to the query >= this",
        )
        self.query_unset = ViewerButton("Clear query", cb_hook=lambda _: self.clear_query())

    # ------------------------------------------------------------------------------------ helpers

    def _host(self) -> nn.Module:
        """The model (never a public attribute: the viewer's walk would recurse into it and loop)."""
        model = self._model_ref()
        if model is None:
            raise RuntimeError("the model these FeaturePanels belong to no longer exists")
        return model

    def _viewer(self):
        return getattr(self.viewer_control, "viewer", None)

    def _lock(self):
        """The viewer's training lock (renders and callbacks hold it), or a no-op without a viewer."""
        viewer = self._viewer()
        lock = getattr(viewer, "train_lock", None)
        return lock if lock is not None else contextlib.nullcontext()

    def _rerender(self) -> None:
        viewer = self._viewer()
        if viewer is not None and hasattr(viewer, "_trigger_rerender"):
            viewer._trigger_rerender()

    def _set_status(self, text: str) -> None:
        self.query_status.value = text

    # ------------------------------------------------------------------------------------ PCA display

    def request_pca_refresh(self) -> None:
        """Refit the display basis from the next full-frame render (see :meth:`after_render`)."""
        self._refit_pending = True

    @torch.no_grad()
    def after_render(self, outputs: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Post-process a full-frame render (``get_outputs_for_camera``) in place and return it.

        Refits the display basis to ``outputs["feature"]`` ``[H, W, D]`` when a refresh is pending
        or the colours are unlocked (and recomputes ``feature_pca`` with it), and adds
        ``segmentation_overlay`` ``[H, W, 3]`` when a query is set.
        """
        display = self._host().feature_display
        feature = outputs.get("feature")
        if feature is not None and (self._refit_pending or not bool(self.pca_lock.value)):
            display.fit_basis(feature.detach())
            outputs["feature_pca"] = display.basis.to_rgb(feature.detach())
            self._refit_pending = False
        if bool(display.has_query) and self.query_status.value == "none":  # loaded with a checkpoint
            self._set_status("set (from the checkpoint)")
        if "segmentation" in outputs and "rgb" in outputs:
            outputs["segmentation_overlay"] = overlay_mask(outputs["rgb"], outputs["segmentation"], self.overlay_alpha)
        return outputs

    # ------------------------------------------------------------------------------------ query

    def set_threshold(self, value: float) -> None:
        self._host().feature_display.threshold = float(value)

    def clear_query(self) -> None:
        """Remove the query (the similarity/segmentation outputs disappear from the next render)."""
        self._host().feature_display.set_query(None)
        self._set_status("none")

    @torch.no_grad()
    def on_click(self, click: ViewerClick) -> Optional[torch.Tensor]:
        """Make the feature along the click's ray the query.

        Args:
            click: ``origin`` in the model's world frame (Nerfstudio already divides the viser
                coordinates by ``VISER_NERFSTUDIO_SCALE_RATIO``), ``direction`` in world axes.

        Returns:
            The ``[D]`` query feature, or None if the ray could not be rendered (the status
            text says why; the previous query is kept).
        """
        model = self._host()
        origin = torch.as_tensor(click.origin, dtype=torch.float32)
        direction = torch.as_tensor(click.direction, dtype=torch.float32)
        try:
            feature = model.feature_at_ray(origin, direction)
        except ValueError as err:
            self._set_status(f"click ignored: {err}")
            return None
        if not bool(torch.isfinite(feature).all()):
            self._set_status("click ignored: the feature along that ray is not finite")
            return None
        model.feature_display.set_query(feature)
        x, y = (float(v) for v in click.screen_pos)
        self._set_status(f"set from a click at ({x:.2f}, {y:.2f}) of the render")
        return feature

    def arm_click(self) -> None:
        """Route the next click in the render to :meth:`on_click` (needs a running viewer)."""
        if getattr(self.viewer_control, "viser_server", None) is None:
            self._set_status("no viewer: clicks need ns-viewer / ns-train with the viewer")
            return
        if self.query_pick.gui_handle is not None:
            self.query_pick.set_disabled(True)
        self._set_status("click a point in the render ...")
        self.viewer_control.register_pointer_cb("click", self._pointer_click, removed_cb=self._click_disarmed)

    def _pointer_click(self, click: ViewerClick) -> None:
        # One pick per press: unregistering also runs _click_disarmed (re-enables the button).
        self.viewer_control.unregister_pointer_cb()
        with self._lock():  # viser calls this on its own thread, outside the render/training lock
            self.on_click(click)
        self._rerender()

    def _click_disarmed(self) -> None:
        if self.query_pick.gui_handle is not None:
            self.query_pick.set_disabled(False)
