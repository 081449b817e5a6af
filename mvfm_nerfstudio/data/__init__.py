"""Posed multi-view scenes, ground-truth correspondences, view-set sampling and a procedural scene generator.

::

    from mvfm_nerfstudio.data import load_scene, correspondences_from_tracks, sample_view_sets
    scene = load_scene("path/to/scene")          # transforms.json and/or COLMAP model
    sets = sample_view_sets(scene, num_views=4, min_shared=50, num_sets=10, seed=0)
    batch = scene.load_views(sets[0], size=(224, 224))
    corr = correspondences_from_tracks(scene, sets[0]).scaled(scene, sets[0], batch.size)

No Nerfstudio imports here (the plugin builds on this package, not the reverse).
"""

from ..errors import SceneError
from .correspondences import Correspondences, correspondences_from_depth, correspondences_from_tracks
from .files import read_depth_file, read_image, read_image_size, read_label_file
from .generator import SceneGeneratorConfig, make_scene
from .readers import (
    attach_colmap_tracks,
    find_colmap_model,
    load_scene,
    read_colmap_model,
    read_colmap_scene,
    read_nerfstudio_scene,
)
from .sampling import GROUPINGS, group_views, sample_view_sets, shared_counts, split_views
from .scene import PosedScene, Tracks, ViewBatch
from .scene_data import SceneData, SceneLike, ViewSet, build_view_sets, heldout_view_sets, prepare_scene

__all__ = [
    "Correspondences",
    "GROUPINGS",
    "PosedScene",
    "SceneData",
    "SceneError",
    "SceneGeneratorConfig",
    "SceneLike",
    "Tracks",
    "ViewBatch",
    "ViewSet",
    "attach_colmap_tracks",
    "build_view_sets",
    "correspondences_from_depth",
    "correspondences_from_tracks",
    "find_colmap_model",
    "group_views",
    "heldout_view_sets",
    "load_scene",
    "make_scene",
    "prepare_scene",
    "read_colmap_model",
    "read_colmap_scene",
    "read_depth_file",
    "read_image",
    "read_image_size",
    "read_label_file",
    "read_nerfstudio_scene",
    "sample_view_sets",
    "shared_counts",
    "split_views",
]
