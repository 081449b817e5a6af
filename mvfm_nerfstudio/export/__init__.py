"""``mvfm-export``: files from a trained ``mvfm-features`` / ``mvfm-splat`` run (its ``config.yml``).

* ``pointcloud``: a ``.ply`` of feature points (surface points of the rendered training views, or the Gaussians'
  centres) in the run's PCA colours, the full feature per point in a companion ``.npy``; optional voxel pooling.
* ``segment``: a query (a pixel of a training view, or a saved ``query_feature.safetensors``) and a threshold give
  the Gaussians above it as a standard 3DGS ``.ply`` (splats) or the segmented point cloud (NeRF).
* ``views``: per-view features (``.npy`` float16), PCA colours, RGB, similarity and masks for the training views
  or a Nerfstudio camera path.

The run is rendered through the models' own paths (no features are recomputed: the feature store reads the run's
cache entry). Modules: :mod:`.run` (loading), :mod:`.query`, :mod:`.points`, :mod:`.ply`, :mod:`.tool`.
"""

from .ply import gaussian_ply_columns, write_features, write_gaussian_ply, write_point_ply
from .points import FeaturePoints, gaussian_features, gaussian_points, render_view, surface_points, voxel_downsample
from .query import QueryOptions, ResolvedQuery, pixel_ray, resolve_query, save_resolved_query
from .run import METHODS, LoadedRun, RunError, load_run
from .tool import Commands, ExportPointCloud, ExportSegment, ExportViews, choose_threshold

__all__ = [
    "METHODS",
    "Commands",
    "ExportPointCloud",
    "ExportSegment",
    "ExportViews",
    "FeaturePoints",
    "LoadedRun",
    "QueryOptions",
    "ResolvedQuery",
    "RunError",
    "choose_threshold",
    "gaussian_features",
    "gaussian_points",
    "gaussian_ply_columns",
    "load_run",
    "pixel_ray",
    "render_view",
    "resolve_query",
    "save_resolved_query",
    "surface_points",
    "voxel_downsample",
    "write_features",
    "write_gaussian_ply",
    "write_point_ply",
]
