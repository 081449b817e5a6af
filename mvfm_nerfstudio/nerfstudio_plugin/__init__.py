"""Nerfstudio plugin: MVFM feature fields (``mvfm-features``) and Gaussian splats with features.

The only package of mvfm-nerfstudio that imports Nerfstudio. Kept import-light on
purpose: Nerfstudio loads entry points while its own modules are still importing, so
this file must not import datamanagers, pipelines or models (a circular import here
breaks every ``ns-*`` command). Import the submodules directly:

* :mod:`.feature_store` — :class:`FeatureStore`: MVFM feature extraction + on-disk cache
  (no Nerfstudio or ray-sampler dependency);
* :mod:`.datamanager` — ray-based (:class:`MVFMDataManager`) and full-image
  (:class:`MVFMFullImageDatamanager`) datamanagers that add ``"feature"`` to batches;
* :mod:`.features_model` — the ``mvfm-features`` model (nerfacto + feature field);
* :mod:`.features_method` — the ``mvfm-features`` method specification (entry point).
"""
