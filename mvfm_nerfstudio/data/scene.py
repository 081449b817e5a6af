"""Posed multi-view scenes: the one type every reader produces and every consumer reads.

Conventions (same as :mod:`mvfm_nerfstudio.geometry.cameras`):

* ``cam_to_world`` ``[N, 4, 4]`` float64, OpenCV axes (x right, y down, z forward).
* ``intrinsics`` ``[N, 3, 3]`` float64 pinhole matrices in pixels of the ORIGINAL image size.
  When the camera has lens distortion, ``intrinsics`` is the pinhole matrix of the
  *undistorted* image produced by :meth:`PosedScene.load_views` (same ``fx, fy, cx, cy``
  as the distorted camera, so undistortion keeps the image size and the principal point).
* Pixel centres at ``(col + 0.5, row + 0.5)``; resizing an image from ``(H, W)`` to
  ``(H', W')`` maps a pixel coordinate ``(u, v)`` to ``(u * W'/W, v * H'/H)`` exactly and the
  intrinsics to ``diag(W'/W, H'/H, 1) @ K``.
* Distortion: OpenCV/COLMAP ``OPENCV`` model ``(k1, k2, p1, p2)`` acting on normalised
  camera coordinates (:mod:`mvfm_nerfstudio.geometry.distortion`).
* Depth: z-depth along the camera's optical axis (not ray length), in scene units
  (``metres = raw * depth_scale``); raw 0 and 65535 (16-bit PNG) are invalid and become NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry.cameras import CameraError, scale_intrinsics, validate_cam_to_world, validate_intrinsics
from ..errors import SceneError
from ..geometry.distortion import has_distortion, undistortion_grid
from ..geometry.feature_grid import floor_to_patch
from ..geometry.normals import (
    DEFAULT_MAX_REL_JUMP,
    camera_to_world_normals,
    normals_from_depth,
    world_to_camera_normals,
)
from .files import read_depth_file, read_image, read_image_size, read_label_file, read_normal_file

__all__ = [
    "SceneError",
    "Tracks",
    "ViewBatch",
    "PosedScene",
    "resize_image",
]

Size = Tuple[int, int]
IndexLike = Union[Sequence[int], torch.Tensor, np.ndarray]


def resize_image(x: torch.Tensor, size: Size, mode: str = "bilinear") -> torch.Tensor:
    """Resize an image or map ``[C, H, W]`` to ``size = (H', W')`` (pixel-centre aligned, the whole image kept).

    ``mode="bilinear"`` is antialiased (matters when shrinking); ``"nearest"`` (labels, depth) picks the nearest
    source pixel centre. Returned unchanged when already of that size.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return F.interpolate(x[None], size=size, mode="nearest-exact")[0]


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass
class Tracks:
    """Flattened SfM observations: 3D point ``point_ids[m]`` seen in view ``image_ids[m]`` at ``xy[m]``.

    Attributes:
        point_ids: ``[M]`` long, ids in ``0..P-1`` (rows of ``points3d`` when present).
        image_ids: ``[M]`` long, index of the view in the scene.
        xy: ``[M, 2]`` float64 pixel coordinates in the ORIGINAL (distorted, as stored by COLMAP)
            image, pixel-centre convention (centre of the top-left pixel = (0.5, 0.5)).
        points3d: ``[P, 3]`` float64 world xyz in the scene's world frame, or None.
    """

    point_ids: torch.Tensor
    image_ids: torch.Tensor
    xy: torch.Tensor
    points3d: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        m = self.point_ids.shape[0]
        if self.image_ids.shape != (m,) or self.xy.shape != (m, 2):
            raise SceneError(
                f"Tracks fields disagree: point_ids {tuple(self.point_ids.shape)}, image_ids "
                f"{tuple(self.image_ids.shape)}, xy {tuple(self.xy.shape)} (expected [M], [M], [M, 2])"
            )

    def __len__(self) -> int:
        return int(self.point_ids.shape[0])

    @property
    def num_points(self) -> int:
        if self.points3d is not None:
            return int(self.points3d.shape[0])
        return int(self.point_ids.max()) + 1 if len(self) else 0

    def select(self, mask: torch.Tensor) -> "Tracks":
        """Observations where ``mask`` ``[M]`` is true (point ids and 3D points unchanged)."""
        return Tracks(self.point_ids[mask], self.image_ids[mask], self.xy[mask], self.points3d)

    def covisibility(self, num_views: int) -> torch.Tensor:
        """``[N, N]`` long: number of 3D points observed in both views (diagonal: points per view)."""
        if len(self) == 0:
            return torch.zeros(num_views, num_views, dtype=torch.long)
        vis = torch.zeros(self.num_points, num_views, dtype=torch.float64)
        vis[self.point_ids, self.image_ids] = 1.0
        return (vis.T @ vis).round().long()


@dataclass
class ViewBatch:
    """A set of S views ready for a model: all float32, OpenCV cameras, one common image size.

    Attributes:
        indices: ``[S]`` long, view indices in the scene.
        images: ``[S, 3, H, W]`` RGB in [0, 1] (undistorted when the scene has distortion).
        intrinsics: ``[S, 3, 3]`` pinhole matrices in pixels of the ``(H, W)`` images.
        cam_to_world: ``[S, 4, 4]`` OpenCV camera-to-world.
        size: ``(H, W)``.
    """

    indices: torch.Tensor
    images: torch.Tensor
    intrinsics: torch.Tensor
    cam_to_world: torch.Tensor
    size: Size

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to(self, device: Union[str, torch.device]) -> "ViewBatch":
        return ViewBatch(
            self.indices.to(device), self.images.to(device), self.intrinsics.to(device),
            self.cam_to_world.to(device), self.size,
        )


def _as_index_list(indices: IndexLike, n: int, scene_name: str) -> List[int]:
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        out = [int(i) for i in indices.reshape(-1).tolist()]
    elif isinstance(indices, (int, np.integer)):
        out = [int(indices)]
    else:
        out = [int(i) for i in indices]
    for i in out:
        if not 0 <= i < n:
            raise SceneError(f"view index {i} is out of range for scene {scene_name!r} with {n} views")
    return out


@dataclass
class PosedScene:
    """Posed images of one scene (see the module docstring for conventions).

    Attributes:
        name: scene name (usually the folder name).
        root: folder the scene was read from.
        image_paths: ``N`` RGB image files.
        intrinsics: ``[N, 3, 3]`` float64 undistorted pinhole K in pixels of the original image size.
        cam_to_world: ``[N, 4, 4]`` float64 OpenCV camera-to-world.
        image_sizes: ``[N, 2]`` long ``(H, W)`` of the original images.
        distortion: ``[N, 4]`` float64 OPENCV ``(k1, k2, p1, p2)`` or None (pinhole).
        depth_paths: ``N`` depth files (z-depth, ``raw * depth_scale``) or None.
        depth_scale: scene units per raw depth unit.
        object_id_paths: ``N`` integer label PNGs (0 = background) or None.
        normal_paths: ``N`` ground-truth normal files (``.npy`` ``[H, W, 3]`` float world-frame unit normals, NaN
            = none; written by the scene generator) or None.
        tracks: SfM tracks (ground-truth correspondences) or None.
        frame_names: ``N`` names used in error messages (defaults to the image file names).
    """

    name: str
    root: Path
    image_paths: List[Path]
    intrinsics: torch.Tensor
    cam_to_world: torch.Tensor
    image_sizes: torch.Tensor
    distortion: Optional[torch.Tensor] = None
    depth_paths: Optional[List[Path]] = None
    depth_scale: float = 1.0
    object_id_paths: Optional[List[Path]] = None
    normal_paths: Optional[List[Path]] = None
    tracks: Optional[Tracks] = None
    frame_names: Optional[List[str]] = None
    _cache: Dict[object, object] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.image_paths = [Path(p) for p in self.image_paths]
        n = len(self.image_paths)
        if n == 0:
            raise SceneError(f"scene {self.name!r} at {self.root} has no views (empty scene)")
        if self.frame_names is None:
            self.frame_names = [p.name for p in self.image_paths]
        self.intrinsics = torch.as_tensor(self.intrinsics, dtype=torch.float64)
        self.cam_to_world = torch.as_tensor(self.cam_to_world, dtype=torch.float64)
        self.image_sizes = torch.as_tensor(self.image_sizes, dtype=torch.long)
        expected = {"intrinsics": (n, 3, 3), "cam_to_world": (n, 4, 4), "image_sizes": (n, 2)}
        for key, shape in expected.items():
            if tuple(getattr(self, key).shape) != shape:
                raise SceneError(
                    f"scene {self.name!r}: {key} has shape {tuple(getattr(self, key).shape)}, expected {shape} "
                    f"for {n} images"
                )
        if self.distortion is not None:
            self.distortion = torch.as_tensor(self.distortion, dtype=torch.float64)
            if tuple(self.distortion.shape) != (n, 4):
                raise SceneError(f"scene {self.name!r}: distortion must be [{n}, 4], got {tuple(self.distortion.shape)}")
            if not has_distortion(self.distortion):
                self.distortion = None
        for key in ("depth_paths", "object_id_paths", "normal_paths"):
            paths = getattr(self, key)
            if paths is not None:
                if len(paths) != n:
                    raise SceneError(f"scene {self.name!r}: {len(paths)} {key} for {n} images")
                setattr(self, key, [Path(p) for p in paths])
        if not (math.isfinite(self.depth_scale) and self.depth_scale > 0):
            raise SceneError(f"scene {self.name!r}: depth_scale must be a positive number, got {self.depth_scale}")
        try:  # all at once; only on failure look for the frame to name
            validate_cam_to_world(self.cam_to_world)
            validate_intrinsics(self.intrinsics)
            sizes_ok = bool((self.image_sizes > 0).all())
        except CameraError:
            sizes_ok = False
        if not sizes_ok:
            for i in range(n):
                frame = f"frame {i} ({self.frame_names[i]}) in scene {self.name!r}"
                try:
                    validate_cam_to_world(self.cam_to_world[i], name=f"pose of {frame}")
                    validate_intrinsics(self.intrinsics[i], name=f"intrinsics of {frame}")
                except CameraError as err:
                    raise SceneError(str(err)) from None
                h, w = (int(v) for v in self.image_sizes[i])
                if h <= 0 or w <= 0:
                    raise SceneError(f"{frame} has invalid image size {h}x{w}")
        # Poses from text files are only approximately orthonormal (7-Scenes: |R^T R - I| ~ 5e-4);
        # snap them onto SO(3) once validated so every consumer sees rigid transforms.
        u, _, vh = torch.linalg.svd(self.cam_to_world[:, :3, :3])
        self.cam_to_world = self.cam_to_world.clone()
        self.cam_to_world[:, :3, :3] = u @ vh
        if self.tracks is not None and len(self.tracks):
            bad = (self.tracks.image_ids < 0) | (self.tracks.image_ids >= n)
            if bad.any():
                raise SceneError(f"scene {self.name!r}: tracks reference view ids outside 0..{n - 1}")

    # ---------------------------------------------------------------- basic info
    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def has_depth(self) -> bool:
        return self.depth_paths is not None

    def image_size(self, index: int) -> Size:
        h, w = self.image_sizes[index].tolist()
        return int(h), int(w)

    def check_files(self, check_depth: bool = True, decode_images: bool = False) -> None:
        """Check every image (and depth/label) file exists, is readable and has the stated size.

        Only file headers are read, unless ``decode_images``: then every image is decoded once (one at a time), which
        also finds truncated or corrupt image data. Raises :class:`SceneError` naming the first bad file.
        """
        for i, path in enumerate(self.image_paths):
            size = read_image_size(path, decode=decode_images)
            if size != self.image_size(i):
                raise SceneError(
                    f"image file {path} is {size[1]}x{size[0]} (WxH) but the scene metadata says "
                    f"{self.image_size(i)[1]}x{self.image_size(i)[0]}; fix w/h in the transforms or the camera model"
                )
        for paths, what in ((self.depth_paths if check_depth else None, "depth"), (self.object_id_paths, "object-id")):
            for path in paths or []:
                if not path.is_file():
                    raise SceneError(f"{what} file {path} does not exist")

    def subset(self, indices: IndexLike) -> "PosedScene":
        """A new scene with only the given views (tracks re-indexed, unobserved points kept)."""
        idx = _as_index_list(indices, len(self), self.name)
        tracks = None
        if self.tracks is not None:
            remap = torch.full((len(self),), -1, dtype=torch.long)
            remap[torch.tensor(idx, dtype=torch.long)] = torch.arange(len(idx))
            sel = remap[self.tracks.image_ids] >= 0
            t = self.tracks.select(sel)
            tracks = Tracks(t.point_ids, remap[t.image_ids], t.xy, t.points3d)
        pick = torch.tensor(idx, dtype=torch.long)
        return PosedScene(
            name=self.name, root=self.root, image_paths=[self.image_paths[i] for i in idx],
            intrinsics=self.intrinsics[pick], cam_to_world=self.cam_to_world[pick], image_sizes=self.image_sizes[pick],
            distortion=None if self.distortion is None else self.distortion[pick],
            depth_paths=None if self.depth_paths is None else [self.depth_paths[i] for i in idx],
            depth_scale=self.depth_scale,
            object_id_paths=None if self.object_id_paths is None else [self.object_id_paths[i] for i in idx],
            normal_paths=None if self.normal_paths is None else [self.normal_paths[i] for i in idx],
            tracks=tracks, frame_names=[self.frame_names[i] for i in idx],
        )

    # ---------------------------------------------------------------- sizes and scaling
    def _target_size(self, idx: List[int], size: Optional[Size], patch_size: Optional[int]) -> Size:
        if size is not None:
            h, w = int(size[0]), int(size[1])
            if h <= 0 or w <= 0:
                raise SceneError(f"size must be positive (H, W), got {size}")
            return h, w
        sizes = {self.image_size(i) for i in idx}
        if len(sizes) > 1:
            raise SceneError(
                f"views {idx} of scene {self.name!r} have different image sizes {sorted(sizes)}; "
                "pass size=(H, W) to resize them to a common size"
            )
        h, w = sizes.pop()
        if patch_size:
            h, w = floor_to_patch((h, w), patch_size)
            if h == 0 or w == 0:
                raise SceneError(f"images of scene {self.name!r} are smaller than one {patch_size}px patch")
        return h, w

    def scale_factors(self, view_index: int, size: Size) -> Tuple[float, float]:
        """``(sx, sy) = (W'/W, H'/H)`` from the original image of ``view_index`` to ``size = (H', W')``."""
        h, w = self.image_size(view_index)
        return size[1] / w, size[0] / h

    def scaled_intrinsics(self, indices: IndexLike, size: Size) -> torch.Tensor:
        """``[S, 3, 3]`` float64 intrinsics of the views resized to ``size`` (``diag(sx, sy, 1) @ K``)."""
        idx = _as_index_list(indices, len(self), self.name)
        return torch.stack([scale_intrinsics(self.intrinsics[i], self.image_size(i), size) for i in idx])

    def scale_points(self, xy: torch.Tensor, view_index: int, size: Size) -> torch.Tensor:
        """Map original-pixel coordinates ``[..., 2]`` of one view to a ``size = (H', W')`` image."""
        sx, sy = self.scale_factors(view_index, size)
        return xy * torch.tensor([sx, sy], dtype=xy.dtype, device=xy.device)

    # ---------------------------------------------------------------- loading
    def _undistort_map(self, i: int, mode: str, x: torch.Tensor) -> torch.Tensor:
        if self.distortion is None or not has_distortion(self.distortion[i]):
            return x
        h, w = x.shape[-2:]
        # keyed by the camera, not the view: views usually share one camera, so it is built once
        key = ("undistort_grid", tuple(self.intrinsics[i].flatten().tolist()), tuple(self.distortion[i].tolist()), h, w)
        grid = self._cache.get(key)
        if grid is None:
            grid = undistortion_grid(self.intrinsics[i], self.distortion[i], h, w)
            self._cache[key] = grid
        sampled = F.grid_sample(x[None].float(), grid, mode=mode, padding_mode="border", align_corners=False)
        return sampled[0].to(x.dtype)

    def load_image(self, index: int) -> torch.Tensor:
        """Original-size RGB ``[3, H, W]`` float32, undistorted if the scene has distortion."""
        path = self.image_paths[index]
        img = read_image(path)
        if tuple(img.shape[-2:]) != self.image_size(index):
            raise SceneError(
                f"image file {path} is {img.shape[-1]}x{img.shape[-2]} (WxH) but the scene metadata says "
                f"{self.image_size(index)[1]}x{self.image_size(index)[0]}"
            )
        return self._undistort_map(index, "bilinear", img)

    def load_views(
        self, indices: IndexLike, size: Optional[Size] = None, patch_size: Optional[int] = None
    ) -> ViewBatch:
        """Load views as a :class:`ViewBatch`.

        Args:
            indices: view indices (S of them).
            size: ``(H, W)`` to resize every view to; None keeps the original size (all views
                must then share one size).
            patch_size: with ``size=None``, round the original size down to a multiple of it
                (the image is resized, not cropped, so intrinsics scale by ``W'/W, H'/H``).
        """
        idx = _as_index_list(indices, len(self), self.name)
        if not idx:
            raise SceneError("load_views needs at least one view index")
        target = self._target_size(idx, size, patch_size)
        images = torch.stack([resize_image(self.load_image(i), target, "bilinear").clamp(0, 1) for i in idx])
        pick = torch.tensor(idx, dtype=torch.long)
        return ViewBatch(
            indices=pick,
            images=images.float(),
            intrinsics=self.scaled_intrinsics(idx, target).float(),
            cam_to_world=self.cam_to_world[pick].float(),
            size=target,
        )

    def _load_maps(self, idx: List[int], size: Optional[Size], paths: List[Path], reader) -> torch.Tensor:
        target = self._target_size(idx, size, None)
        out = []
        for i in idx:
            m = reader(paths[i]).unsqueeze(0)
            if tuple(m.shape[-2:]) != self.image_size(i):
                # Maps of another resolution cover the same field of view: resample to the image grid.
                m = resize_image(m.float(), self.image_size(i), "nearest").to(m.dtype)
            m = self._undistort_map(i, "nearest", m.float()).to(m.dtype)
            out.append(resize_image(m.float(), target, "nearest").to(m.dtype)[0])
        return torch.stack(out)

    def load_depth(self, indices: IndexLike, size: Optional[Size] = None) -> torch.Tensor:
        """Depth ``[S, H, W]`` float32 z-depth in scene units, NaN where invalid (nearest resize)."""
        if self.depth_paths is None:
            raise SceneError(f"scene {self.name!r} has no depth maps")
        idx = _as_index_list(indices, len(self), self.name)
        return self._load_maps(idx, size, self.depth_paths, lambda p: read_depth_file(p, self.depth_scale))

    def load_object_ids(self, indices: IndexLike, size: Optional[Size] = None) -> torch.Tensor:
        """Object ids ``[S, H, W]`` long (0 = background), nearest-neighbour resized."""
        if self.object_id_paths is None:
            raise SceneError(f"scene {self.name!r} has no object-id maps")
        idx = _as_index_list(indices, len(self), self.name)
        return self._load_maps(idx, size, self.object_id_paths, read_label_file)

    @property
    def has_normals(self) -> bool:
        """Ground-truth normals are available: normal files, or depth maps to derive them from."""
        return self.normal_paths is not None or self.depth_paths is not None

    def load_normals(
        self,
        indices: IndexLike,
        size: Optional[Size] = None,
        frame: str = "camera",
        source: str = "auto",
        max_rel_jump: float = DEFAULT_MAX_REL_JUMP,
        smooth_radius: int = 3,
    ) -> torch.Tensor:
        """Ground-truth unit normals ``[S, 3, H, W]`` float32, NaN where there is none (nearest resize).

        Args:
            indices: view indices.
            size: ``(H, W)`` output size; None keeps the original size (all views must share it).
            frame: ``"camera"`` (each view's OpenCV camera frame) or ``"world"``.
            source: ``"files"`` (``normal_paths``: exact, generated scenes), ``"depth"`` (derived from the depth
                maps at their full resolution by :func:`~mvfm_nerfstudio.geometry.normals.normals_from_depth`,
                then resized), or ``"auto"`` (files if present, else depth).
            max_rel_jump: depth-discontinuity threshold for ``source="depth"``.
            smooth_radius: for ``source="depth"``: normals averaged over a ``(2r+1)^2`` window at the depth map's
                resolution (sensor depth is too noisy for per-pixel differences); 0 = off.
        """
        if frame not in ("camera", "world"):
            raise SceneError(f"frame must be 'camera' or 'world', got {frame!r}")
        if source not in ("auto", "files", "depth"):
            raise SceneError(f"source must be 'auto', 'files' or 'depth', got {source!r}")
        if source == "auto":
            source = "files" if self.normal_paths is not None else "depth"
        if source == "files" and self.normal_paths is None:
            raise SceneError(f"scene {self.name!r} has no normal files (no normal_file_path in its transforms.json); "
                             "use source='depth' if it has depth maps")
        if source == "depth" and self.depth_paths is None:
            raise SceneError(
                f"scene {self.name!r} has neither normal files nor depth maps: ground-truth normals need a "
                "per-frame normal_file_path or depth_file_path in transforms.json"
            )
        idx = _as_index_list(indices, len(self), self.name)
        target = self._target_size(idx, size, None)
        out = []
        for i in idx:
            c2w = self.cam_to_world[i]
            if source == "files":
                n = read_normal_file(self.normal_paths[i])  # [3, H, W] world frame
                if tuple(n.shape[-2:]) != self.image_size(i):
                    raise SceneError(
                        f"normal file {self.normal_paths[i]} is {n.shape[-2]}x{n.shape[-1]} (HxW) but its image "
                        f"{self.frame_names[i]} is {self.image_size(i)[0]}x{self.image_size(i)[1]}: normal maps "
                        "must have the image's size"
                    )
                n = self._undistort_map(i, "nearest", n)
                if frame == "camera":
                    n = world_to_camera_normals(n, c2w)
            else:
                depth = self.load_depth([i])[0]  # original image size, undistorted
                n = normals_from_depth(depth, self.intrinsics[i], max_rel_jump, smooth_radius)
                if frame == "world":
                    n = camera_to_world_normals(n, c2w)
            out.append(resize_image(n.float(), target, "nearest"))
        return torch.stack(out)
