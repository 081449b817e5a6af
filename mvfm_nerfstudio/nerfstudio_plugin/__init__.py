"""Nerfstudio plugin: MVFM feature fields (``mvfm-features``) and Gaussian splats with features.

The only package of mvfm-nerfstudio that imports Nerfstudio. Kept import-light on
purpose: Nerfstudio loads entry points while its own modules are still importing, so
this file must not import datamanagers, pipelines or models (a circular import here
breaks every ``ns-*`` command). Import the submodules directly:

* :mod:`.datamanager` — ray-based (:class:`MVFMDataManager`) and full-image
  (:class:`MVFMFullImageDatamanager`) datamanagers that add ``"feature"`` to batches
  (features from the core's :class:`~mvfm_nerfstudio.feature_store.FeatureStore`);
* :mod:`.feature_head` — the feature head both models share (config fields, loss and metric,
  display basis, query, viewer panels, lazy LPIPS);
* :mod:`.features_model` / :mod:`.features_method` — ``mvfm-features`` (nerfacto + feature field);
* :mod:`.splat_model` / :mod:`.splat_method` — ``mvfm-splat`` (splatfacto + per-Gaussian latents,
  rendered with the core's :mod:`mvfm_nerfstudio.splatting`);
* :mod:`.viewer_panels` — PCA colours and click-to-query controls in the viewer;
* :mod:`.demo` — ``mvfm-demo``.
"""
