"""Multi-view segmentation from one query feature (the library behind ``mvfm-segment``).

Pipeline (:func:`segment_scene`):

1. MVFM features of every view of a posed scene, through the same feature store (and on-disk
   cache) the Nerfstudio plugin uses: views grouped into sets of nearest views, the MVFM run
   set by set, a view's features averaged over the sets it is in, optionally PCA-reduced
   (centred) to ``feature_dim`` channels. Each view's ``[h, w, D]`` map spans its whole image:
   cell ``(i, j)`` is centred at pixel ``((j + 0.5) W / w, (i + 0.5) H / h)``.
2. A query feature ``[D]``: bilinearly sampled at a pixel of one view
   (:func:`~mvfm_nerfstudio.geometry.feature_grid.sample_map`, same pixel-centre convention), or loaded from a
   ``query_feature.safetensors`` written by an earlier run (:func:`load_query`).
3. Cosine similarity of every cell with the query, upsampled to each image's original
   resolution (bilinear, ``align_corners=False``: pixel-centre correct), and one threshold for
   all views: a fixed cosine value, or Otsu's threshold on the histogram of all views'
   upsampled similarities pooled together (:func:`pooled_otsu_threshold`), so every view is cut at
   the same level and the masks are consistent.
4. Outputs (:func:`write_outputs`): ``masks/<image stem>.png`` (8-bit, 255 = in the
   segment, original resolution), ``similarity/<image stem>.png`` (turbo colour map of the
   cosine similarity clamped to [0, 1]), ``overview.png`` (thumbnails with the mask tinted
   and outlined, the query point marked), ``query_feature.safetensors`` and ``segment.json``.

No Nerfstudio import here: the feature extraction is the core's :class:`FeatureStore`
(:mod:`mvfm_nerfstudio.feature_store`), shared with the Nerfstudio plugin. Modules: :mod:`.masks`,
:mod:`.images`, :mod:`.query`, :mod:`.tool` (``mvfm-segment``).
"""

from .images import heatmap, overview_image, save_png
from .masks import (
    MultiViewSegmentation, mask_iou, otsu_threshold, pooled_otsu_threshold, segment_views, similarity_grid,
)
from .query import QueryFeature, load_query, query_in_space, save_query
from .tool import SegmentConfig, segment_scene, write_outputs

__all__ = [
    "MultiViewSegmentation",
    "QueryFeature",
    "SegmentConfig",
    "heatmap",
    "load_query",
    "mask_iou",
    "otsu_threshold",
    "pooled_otsu_threshold",
    "overview_image",
    "query_in_space",
    "save_png",
    "save_query",
    "segment_scene",
    "segment_views",
    "similarity_grid",
    "write_outputs",
]
