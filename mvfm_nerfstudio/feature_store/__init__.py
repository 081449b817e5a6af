"""MVFM feature extraction for a set of posed training views, with a content-keyed disk cache.

:class:`FeatureStore` is shared by the Nerfstudio plugin's datamanagers (ray-based for NeRF,
full-image for splatting) and by ``mvfm-segment``. It has no Nerfstudio or ray-sampler dependency:
it is given plain tensors (:class:`ViewSource`). Modules:

* :mod:`.config`: :class:`FeatureStoreConfig` (a :class:`~mvfm_nerfstudio.models.build.ModelSpec` plus
  the extraction options) and :class:`ViewSource`;
* :mod:`.cache`: content keys and the entry layout on disk;
* :mod:`.extract`: computing an entry (view grouping, optional per-scene adaptation, the MVFM run,
  averaging, PCA reduction);
* :mod:`.store`: :class:`FeatureStore` (load or compute, then sample).
"""

from .cache import CACHE_FORMAT_VERSION
from .config import FeatureStoreConfig, ViewSource, default_cache_dir
from .store import FeatureStore, describe

__all__ = ["CACHE_FORMAT_VERSION", "FeatureStore", "FeatureStoreConfig", "ViewSource", "default_cache_dir", "describe"]
