"""Posed multi-view scenes, ground-truth correspondences, view-set sampling and a procedural scene generator.

::

    from mvfm_nerfstudio.data import load_scene, correspondences_from_tracks, sample_view_sets
    scene = load_scene("path/to/scene")          # transforms.json and/or COLMAP model
    sets = sample_view_sets(scene, num_views=4, min_shared=50, num_sets=10, seed=0)
    batch = scene.load_views(sets[0], size=(224, 224))
    corr = correspondences_from_tracks(scene, sets[0]).scaled(scene, sets[0], batch.size)

No Nerfstudio imports here (the plugin builds on this package, not the reverse).
"""

from .correspondences import Correspondences, correspondences_from_depth, correspondences_from_tracks, project_points
from .generator import SceneGeneratorConfig, make_scene
from .readers import (
    attach_colmap_tracks,
    find_colmap_model,
    load_scene,
    read_colmap_model,
    read_colmap_scene,
    read_nerfstudio_scene,
)
from .sampling import sample_view_sets, shared_counts, split_views
from .scene import PosedScene, SceneError, Tracks, ViewBatch, undistort_pixels

__all__ = [
    "Correspondences",
    "PosedScene",
    "SceneError",
    "SceneGeneratorConfig",
    "Tracks",
    "ViewBatch",
    "attach_colmap_tracks",
    "correspondences_from_depth",
    "correspondences_from_tracks",
    "find_colmap_model",
    "load_scene",
    "make_scene",
    "project_points",
    "read_colmap_model",
    "read_colmap_scene",
    "read_nerfstudio_scene",
    "sample_view_sets",
    "shared_counts",
    "split_views",
    "undistort_pixels",
]
