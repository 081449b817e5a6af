"""Scene readers: Nerfstudio ``transforms.json`` and COLMAP models -> :class:`PosedScene`.

* :func:`read_nerfstudio_scene` reads OpenGL ``transform_matrix`` poses, global or per-frame
  ``fl_x, fl_y, cx, cy, w, h`` (or ``camera_angle_x``), OPENCV distortion ``k1, k2, p1, p2``,
  ``depth_file_path`` + ``depth_unit_scale_factor`` and the custom per-frame ``object_id_path`` and ``normal_file_path``.
  Frames are sorted by file path, exactly like Nerfstudio's dataparser, so view ``i`` here is
  image ``i`` of ``DataparserOutputs`` before the train/eval split.
* :func:`read_colmap_scene` reads a COLMAP model (``cameras/images/points3D`` .bin or .txt)
  with pycolmap: world-to-camera OpenCV poses are inverted, images sorted by name.
* :func:`load_scene` auto-detects the format; when a folder has both a ``transforms.json`` and
  a COLMAP model (``colmap_knownposes/``, ``colmap/sparse/0``, ``sparse/0``), poses and
  intrinsics come from ``transforms.json`` and the COLMAP tracks are attached (images matched
  by file name, COLMAP poses checked against the transforms, a warning if they disagree).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..errors import SceneError
from ..geometry.cameras import invert_pose, opengl_to_opencv
from .files import read_image_size
from .scene import PosedScene, Tracks

__all__ = [
    "COLMAP_MODEL_DIRS",
    "load_scene",
    "read_nerfstudio_scene",
    "read_colmap_scene",
    "read_colmap_model",
    "attach_colmap_tracks",
    "find_colmap_model",
    "pose_agreement",
]

PathLike = Union[str, Path]

# Sub-folders searched (in order) for a COLMAP model beside a transforms.json.
COLMAP_MODEL_DIRS = ("colmap_knownposes", "colmap/sparse/0", "sparse/0", "sparse")

# Nerfstudio's implicit applied_transform for folders made by ns-process-data from colmap/sparse/0.
_NS_LEGACY_APPLIED_TRANSFORM = [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]]

_SUPPORTED_NS_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "RADIAL", "SIMPLE_RADIAL")


def _is_colmap_model(path: Path) -> bool:
    return all((path / f"{n}.bin").is_file() for n in ("cameras", "images")) or all(
        (path / f"{n}.txt").is_file() for n in ("cameras", "images")
    )


def find_colmap_model(root: PathLike) -> Optional[Path]:
    """First COLMAP model folder among ``root`` and :data:`COLMAP_MODEL_DIRS` under it, or None."""
    root = Path(root)
    for sub in ("",) + COLMAP_MODEL_DIRS:
        cand = root / sub if sub else root
        if cand.is_dir() and _is_colmap_model(cand):
            return cand
    return None


# --------------------------------------------------------------------------------------------
# Nerfstudio transforms.json
# --------------------------------------------------------------------------------------------


def _num(frame: dict, meta: dict, key: str, where: str, default=None) -> Optional[float]:
    value = frame.get(key, meta.get(key, default))
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise SceneError(f"{where}: {key} = {value!r} is not a number") from None
    if not math.isfinite(value):
        raise SceneError(f"{where}: {key} is {value} (must be finite)")
    return value


def _read_transforms(path: Path) -> Tuple[Path, dict, List[dict]]:
    """``(transforms.json path, its contents, frames sorted like Nerfstudio's dataparser)``."""
    json_path = path if path.suffix == ".json" else path / "transforms.json"
    if not json_path.is_file():
        raise SceneError(f"{json_path} does not exist; expected a Nerfstudio scene folder with transforms.json")
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError as err:
        raise SceneError(f"{json_path} is not valid JSON: {err}") from None
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneError(f"{json_path} has no frames (empty scene)")
    for i, frame in enumerate(frames):
        if "file_path" not in frame or "transform_matrix" not in frame:
            raise SceneError(f"{json_path}: frame {i} needs 'file_path' and 'transform_matrix'")
    # Nerfstudio sorts frames by file name; so do we, so indices agree with its dataparser.
    root = json_path.parent
    return json_path, meta, sorted(frames, key=lambda f: str(root / f["file_path"]))


def _frame_camera(frame: dict, meta: dict, image_path: Path, where: str):
    """``(K [3][3], (h, w), (k1, k2, p1, p2))`` of one frame (per-frame values override the global ones)."""
    model = str(frame.get("camera_model", meta.get("camera_model", "OPENCV"))).upper()
    if model not in _SUPPORTED_NS_MODELS:
        raise SceneError(f"{where}: camera_model {model} is not supported (supported: {_SUPPORTED_NS_MODELS})")
    for extra in ("k3", "k4"):
        if abs(_num(frame, meta, extra, where, 0.0)) > 0:
            raise SceneError(f"{where}: distortion coefficient {extra} is not supported (OPENCV k1,k2,p1,p2 only)")
    if "distortion_params" in frame or "distortion_params" in meta:
        raise SceneError(f"{where}: 'distortion_params' is not supported; use k1, k2, p1, p2")
    w, h = _num(frame, meta, "w", where), _num(frame, meta, "h", where)
    if w is None or h is None:
        hh, ww = read_image_size(image_path)
        w, h = w or ww, h or hh
    fx = _num(frame, meta, "fl_x", where)
    fy = _num(frame, meta, "fl_y", where)
    if fx is None:
        angle = _num(frame, meta, "camera_angle_x", where)
        if angle is None:
            raise SceneError(f"{where}: no focal length (fl_x or camera_angle_x)")
        fx = 0.5 * w / math.tan(0.5 * angle)
    if fy is None:
        angle_y = _num(frame, meta, "camera_angle_y", where)
        fy = 0.5 * h / math.tan(0.5 * angle_y) if angle_y is not None else fx
    cx = _num(frame, meta, "cx", where, w / 2.0)
    cy = _num(frame, meta, "cy", where, h / 2.0)
    k = [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]
    return k, (int(round(h)), int(round(w))), [_num(frame, meta, c, where, 0.0) for c in ("k1", "k2", "p1", "p2")]


def _frame_pose(frame: dict, where: str) -> np.ndarray:
    """OpenGL camera-to-world ``[4, 4]`` of one frame (``transform_matrix``, 4x4 or 3x4)."""
    mat = np.asarray(frame["transform_matrix"], dtype=np.float64)
    if mat.shape == (3, 4):
        mat = np.vstack([mat, [0, 0, 0, 1]])
    if mat.shape != (4, 4):
        raise SceneError(f"{where}: transform_matrix must be 4x4 or 3x4, got shape {mat.shape}")
    return mat


def _optional_paths(frames: List[dict], root: Path, key: str, json_path: Path) -> Optional[List[Path]]:
    """Per-frame paths under ``key`` (all frames or none)."""
    paths = [root / f[key] for f in frames if key in f]
    if paths and len(paths) != len(frames):
        raise SceneError(f"{json_path}: {key} is given for {len(paths)} of {len(frames)} frames (need all or none)")
    return paths or None


def read_nerfstudio_scene(path: PathLike, check_files: bool = True, name: Optional[str] = None) -> PosedScene:
    """Read a Nerfstudio/instant-ngp ``transforms.json`` into a :class:`PosedScene`.

    Args:
        path: the scene folder or the ``transforms.json`` file itself.
        check_files: open every image header (existence, readability, size); when ``w``/``h``
            are missing the sizes are read from the headers regardless.
        name: scene name (default: the folder name).
    """
    json_path, meta, frames = _read_transforms(Path(path))
    root = json_path.parent
    image_paths, sizes, ks, dists, poses = [], [], [], [], []
    for frame in frames:
        where = f"{json_path} frame {frame['file_path']!r}"
        image_paths.append(root / frame["file_path"])
        k, size, dist = _frame_camera(frame, meta, image_paths[-1], where)
        ks.append(k)
        sizes.append(list(size))
        dists.append(dist)
        poses.append(_frame_pose(frame, where))
    dist = torch.tensor(dists, dtype=torch.float64)
    scene = PosedScene(
        name=name or root.name,
        root=root,
        image_paths=image_paths,
        intrinsics=torch.tensor(ks, dtype=torch.float64),
        cam_to_world=opengl_to_opencv(torch.from_numpy(np.stack(poses))),
        image_sizes=torch.tensor(sizes, dtype=torch.long),
        distortion=dist if bool((dist != 0).any()) else None,
        depth_paths=_optional_paths(frames, root, "depth_file_path", json_path),
        depth_scale=float(meta.get("depth_unit_scale_factor", 1e-3)),
        object_id_paths=_optional_paths(frames, root, "object_id_path", json_path),
        normal_paths=_optional_paths(frames, root, "normal_file_path", json_path),
        frame_names=[str(f["file_path"]) for f in frames],
    )
    applied = meta.get("applied_transform")
    if applied is None and (root / "colmap" / "sparse" / "0").is_dir():
        applied = _NS_LEGACY_APPLIED_TRANSFORM
    if applied is not None:
        scene._cache["applied_transform"] = torch.tensor(applied, dtype=torch.float64)
    if check_files:
        scene.check_files()
    return scene


# --------------------------------------------------------------------------------------------
# COLMAP
# --------------------------------------------------------------------------------------------


def _colmap_camera(cam, where: str) -> Tuple[List[List[float]], List[float]]:
    """COLMAP camera -> (K 3x3, (k1, k2, p1, p2)) for the models we can represent."""
    p = [float(v) for v in cam.params]
    model = str(cam.model_name if hasattr(cam, "model_name") else cam.model).split(".")[-1].upper()
    if model == "SIMPLE_PINHOLE":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], [0.0, 0.0, 0.0, 0.0]
    elif model == "PINHOLE":
        fx, fy, cx, cy = p[:4]
        dist = [0.0] * 4
    elif model == "SIMPLE_RADIAL":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], [p[3], 0.0, 0.0, 0.0]
    elif model == "RADIAL":
        fx = fy = p[0]
        cx, cy, dist = p[1], p[2], [p[3], p[4], 0.0, 0.0]
    elif model == "OPENCV":
        fx, fy, cx, cy = p[:4]
        dist = p[4:8]
    else:
        raise SceneError(
            f"{where}: COLMAP camera model {model} is not supported "
            "(PINHOLE, SIMPLE_PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV); undistort the images with COLMAP first"
        )
    return [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], dist


def _cam_from_world(image) -> np.ndarray:
    """World-to-camera 4x4 of a pycolmap image (API differs between pycolmap versions)."""
    pose = image.cam_from_world
    if callable(pose):  # pycolmap >= 3.12 / 4.x: method
        pose = pose()
    mat = np.asarray(pose.matrix(), dtype=np.float64)
    return np.vstack([mat, [0, 0, 0, 1]])


def read_colmap_model(model_dir: PathLike) -> Dict[str, object]:
    """Read a COLMAP model with pycolmap into plain arrays, images sorted by name.

    Returns a dict with ``names`` (list), ``cam_to_world`` [N,4,4] OpenCV, ``intrinsics`` [N,3,3],
    ``distortion`` [N,4], ``sizes`` [N,2] (H, W) of the COLMAP cameras, and ``tracks``
    (:class:`Tracks` indexed by the sorted image order, point ids compacted to 0..P-1).
    """
    import pycolmap

    model_dir = Path(model_dir)
    if not _is_colmap_model(model_dir):
        raise SceneError(f"{model_dir} is not a COLMAP model (needs cameras.bin/images.bin or .txt)")
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as err:
        raise SceneError(f"pycolmap could not read the COLMAP model in {model_dir}: {err}") from err
    images = sorted(rec.images.values(), key=lambda im: im.name)
    images = [im for im in images if getattr(im, "has_pose", True)]
    if not images:
        raise SceneError(f"COLMAP model {model_dir} has no posed images (empty scene)")
    names, c2w, ks, dists, sizes = [], [], [], [], []
    for i, im in enumerate(images):
        cam = rec.cameras[im.camera_id]
        k, d = _colmap_camera(cam, f"{model_dir} image {im.name}")
        names.append(im.name)
        w2c = _cam_from_world(im)
        if not np.isfinite(w2c).all():
            raise SceneError(f"{model_dir}: image {im.name} has a non-finite pose")
        c2w.append(invert_pose(torch.from_numpy(w2c)).numpy())
        ks.append(k)
        dists.append(d)
        sizes.append([int(cam.height), int(cam.width)])

    # Observations per image (iterating images is much faster than looking up each track element).
    pids, iids, xys, xyz = [], [], [], []
    point_index: Dict[int, int] = {}
    for i, im in enumerate(images):
        obs = im.get_observation_points2D() if hasattr(im, "get_observation_points2D") else [
            p for p in im.points2D if p.has_point3D()
        ]
        for p in obs:
            pid = int(p.point3D_id)
            if pid not in point_index:
                point_index[pid] = len(xyz)
                xyz.append(np.asarray(rec.points3D[pid].xyz, dtype=np.float64))
            pids.append(point_index[pid])
            iids.append(i)
            xys.append(np.asarray(p.xy, dtype=np.float64))
    tracks = Tracks(
        point_ids=torch.tensor(pids, dtype=torch.long),
        image_ids=torch.tensor(iids, dtype=torch.long),
        xy=torch.from_numpy(np.asarray(xys, dtype=np.float64).reshape(-1, 2)),
        points3d=torch.from_numpy(np.asarray(xyz, dtype=np.float64).reshape(-1, 3)),
    )
    return {
        "names": names,
        "cam_to_world": torch.from_numpy(np.stack(c2w)),
        "intrinsics": torch.tensor(ks, dtype=torch.float64),
        "distortion": torch.tensor(dists, dtype=torch.float64),
        "sizes": torch.tensor(sizes, dtype=torch.long),
        "tracks": tracks,
    }


def _find_images_dir(model_dir: Path) -> Path:
    for cand in (model_dir / "images", model_dir.parent / "images", model_dir.parent.parent / "images",
                 model_dir.parent.parent.parent / "images"):
        if cand.is_dir():
            return cand
    raise SceneError(f"no images folder found next to the COLMAP model {model_dir}; pass images_dir=")


def read_colmap_scene(
    colmap_model_dir: PathLike, images_dir: Optional[PathLike] = None, check_files: bool = True,
    name: Optional[str] = None,
) -> PosedScene:
    """Read a COLMAP model (poses, intrinsics, tracks) and its images into a :class:`PosedScene`.

    Args:
        colmap_model_dir: folder with ``cameras``/``images``/``points3D`` (.bin or .txt).
        images_dir: image folder (default: ``images/`` beside or up to three levels above the model).
        check_files: open every image header (existence, readability, size).
    """
    model_dir = Path(colmap_model_dir)
    model = read_colmap_model(model_dir)
    img_dir = Path(images_dir) if images_dir is not None else _find_images_dir(model_dir)
    root = img_dir.parent
    scene = PosedScene(
        name=name or root.name,
        root=root,
        image_paths=[img_dir / n for n in model["names"]],
        intrinsics=model["intrinsics"],
        cam_to_world=model["cam_to_world"],
        image_sizes=model["sizes"],
        distortion=model["distortion"],
        tracks=model["tracks"],
        frame_names=list(model["names"]),
    )
    if check_files:
        scene.check_files()
    return scene


def pose_agreement(c2w_a: torch.Tensor, c2w_b: torch.Tensor) -> Tuple[float, float]:
    """``(max rotation error in degrees, max centre error relative to the camera extent)``."""
    rel = c2w_a[:, :3, :3].transpose(-1, -2) @ c2w_b[:, :3, :3]
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    rot_deg = float(torch.rad2deg(torch.arccos(cos)).max())
    ca, cb = c2w_a[:, :3, 3], c2w_b[:, :3, 3]
    extent = float((ca - ca.mean(0)).norm(dim=-1).max().clamp_min(1e-12))
    return rot_deg, float((ca - cb).norm(dim=-1).max()) / extent


def attach_colmap_tracks(
    scene: PosedScene, model_dir: PathLike, max_rot_deg: float = 1.0, max_center_rel: float = 0.02
) -> PosedScene:
    """Attach the tracks of a COLMAP model to ``scene`` (in place; also returned).

    Images are matched by file name. Track pixels are rescaled when the COLMAP cameras have
    another resolution than the scene's images. The COLMAP poses (mapped into the
    transforms' world with ``applied_transform`` when the transforms.json has one) are compared
    with the scene poses; a warning is issued when they disagree by more than ``max_rot_deg``
    or ``max_center_rel`` of the camera extent, or when the COLMAP intrinsics differ.
    """
    model_dir = Path(model_dir)
    model = read_colmap_model(model_dir)
    by_name = {p.name: i for i, p in enumerate(scene.image_paths)}
    if len(by_name) != len(scene):
        raise SceneError(f"scene {scene.name!r} has duplicate image file names; cannot match COLMAP images by name")
    col_to_scene = torch.full((len(model["names"]),), -1, dtype=torch.long)
    for j, n in enumerate(model["names"]):
        col_to_scene[j] = by_name.get(Path(n).name, -1)
    matched = (col_to_scene >= 0).nonzero().flatten()
    if len(matched) == 0:
        raise SceneError(f"no image of the COLMAP model {model_dir} matches an image of scene {scene.name!r} by name")
    if len(matched) < len(model["names"]):
        warnings.warn(f"{len(model['names']) - len(matched)} COLMAP images in {model_dir} are not in the scene")

    c2w_col = model["cam_to_world"][matched]
    applied = scene._cache.get("applied_transform")
    if applied is not None:
        a = torch.eye(4, dtype=torch.float64)
        a[:3, :4] = applied
        c2w_col = a @ c2w_col
    sidx = col_to_scene[matched]
    rot_deg, center_rel = pose_agreement(scene.cam_to_world[sidx], c2w_col)
    if rot_deg > max_rot_deg or center_rel > max_center_rel:
        warnings.warn(
            f"COLMAP poses in {model_dir} disagree with the poses of scene {scene.name!r}: up to {rot_deg:.3g} deg "
            f"rotation and {100 * center_rel:.3g}% of the camera extent; the tracks may not fit the poses"
        )
    sizes_col = model["sizes"][matched].double()
    sizes_scene = scene.image_sizes[sidx].double()
    scale_hw = sizes_scene / sizes_col  # [n, 2] (sy, sx)
    k_col = model["intrinsics"][matched].clone()
    k_col[:, 0] *= scale_hw[:, 1:2]
    k_col[:, 1] *= scale_hw[:, 0:1]
    if not torch.allclose(k_col, scene.intrinsics[sidx], rtol=1e-3, atol=1e-2):
        warnings.warn(f"COLMAP intrinsics in {model_dir} differ from those of scene {scene.name!r}")

    t = model["tracks"]
    keep = col_to_scene[t.image_ids] >= 0
    t = t.select(keep)
    colmap_view = t.image_ids
    per_view_scale = torch.ones(len(model["names"]), 2, dtype=torch.float64)
    per_view_scale[matched] = scale_hw.flip(-1)  # (sx, sy)
    xy = t.xy * per_view_scale[colmap_view]
    points3d = t.points3d
    if points3d is not None and applied is not None:
        points3d = points3d @ applied[:, :3].T + applied[:, 3]
    scene.tracks = Tracks(point_ids=t.point_ids, image_ids=col_to_scene[colmap_view], xy=xy, points3d=points3d)
    return scene


def load_scene(
    path: PathLike, tracks: Union[bool, PathLike] = True, check_files: bool = True, name: Optional[str] = None
) -> PosedScene:
    """Load a scene folder, auto-detecting the format.

    Args:
        path: a folder with ``transforms.json`` (Nerfstudio), the ``transforms.json`` itself, a
            COLMAP model folder, or a folder containing one (``sparse/0``, ``colmap/sparse/0``, ...).
        tracks: for Nerfstudio scenes, attach tracks from a COLMAP model found beside the
            transforms (True), from the given model folder (a path), or not at all (False).
        check_files: open every image header (existence, readability, size).
    """
    path = Path(path)
    if not path.exists():
        raise SceneError(f"scene path {path} does not exist")
    if path.suffix == ".json" or (path / "transforms.json").is_file():
        scene = read_nerfstudio_scene(path, check_files=check_files, name=name)
        if tracks is True:
            model_dir = find_colmap_model(scene.root)
            if model_dir is not None:
                try:
                    attach_colmap_tracks(scene, model_dir)
                except SceneError as err:  # an auto-detected model must not make the scene unloadable
                    warnings.warn(f"ignoring the COLMAP model found beside {scene.root}: {err}")
        elif tracks is not False:
            attach_colmap_tracks(scene, Path(tracks))
        return scene
    model_dir = find_colmap_model(path)
    if model_dir is not None:
        return read_colmap_scene(model_dir, check_files=check_files, name=name or path.name)
    raise SceneError(
        f"{path} is neither a Nerfstudio scene (transforms.json) nor a COLMAP model "
        f"(cameras.bin/images.bin in it or in one of {COLMAP_MODEL_DIRS})"
    )
