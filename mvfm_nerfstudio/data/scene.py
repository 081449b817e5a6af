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
  camera coordinates.
* Depth: z-depth along the camera's optical axis (not ray length), in scene units
  (``metres = raw * depth_scale``); raw 0 and 65535 (16-bit PNG) are invalid and become NaN.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry.cameras import CameraError, validate_cam_to_world, validate_intrinsics

__all__ = [
    "SceneError",
    "Tracks",
    "ViewBatch",
    "PosedScene",
    "distort_normalized",
    "undistort_normalized",
    "undistort_pixels",
    "read_image",
    "read_image_size",
    "read_depth_file",
    "read_label_file",
    "single_threaded",
]

Size = Tuple[int, int]
IndexLike = Union[Sequence[int], torch.Tensor, np.ndarray]


class SceneError(ValueError):
    """Raised for invalid scenes: missing/corrupt files, bad poses, mismatched sizes, too few views."""


@contextlib.contextmanager
def single_threaded():
    """Run torch ops single-threaded inside the block (restores the thread count afterwards).

    The data layer's work is many small elementwise ops, which gain nothing from intra-op
    threads; on shared CPUs a 2-thread pool made them up to ~10x slower (threads waiting for
    each other while descheduled), so batch jobs (scene rendering, covisibility) use one thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------
# Lens distortion (OpenCV k1, k2, p1, p2 on normalised coordinates)
# --------------------------------------------------------------------------------------------


def distort_normalized(xy: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Apply OPENCV distortion to normalised camera coordinates.

    Args:
        xy: ``[..., 2]`` undistorted normalised coordinates ``(X/Z, Y/Z)``.
        dist: ``[4]`` or broadcastable ``[..., 4]`` coefficients ``(k1, k2, p1, p2)``.
    Returns:
        ``[..., 2]`` distorted normalised coordinates.
    """
    k1, k2, p1, p2 = dist.to(xy.dtype).unbind(-1)
    x, y = xy.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + k1 * r2 + k2 * r2 * r2
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return torch.stack([xd, yd], dim=-1)


def undistort_normalized(xy_d: torch.Tensor, dist: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Invert :func:`distort_normalized` by Newton iterations (analytic Jacobian).

    Args:
        xy_d: ``[..., 2]`` distorted normalised coordinates.
        dist: ``[4]`` or broadcastable ``[..., 4]`` ``(k1, k2, p1, p2)``.
    Returns:
        ``[..., 2]`` undistorted normalised coordinates (float64 precision internally).
    """
    dtype = xy_d.dtype
    target = xy_d.double()
    d = dist.double()
    k1, k2, p1, p2 = d.unbind(-1)
    xy = target.clone()
    for _ in range(iters):
        x, y = xy.unbind(-1)
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        dr = 2 * (k1 + 2 * k2 * r2)  # d radial / d(x or y) divided by the coordinate
        j00 = radial + x * x * dr + 2 * p1 * y + 6 * p2 * x
        j01 = x * y * dr + 2 * p1 * x + 2 * p2 * y
        j11 = radial + y * y * dr + 6 * p1 * y + 2 * p2 * x
        res = distort_normalized(xy, d) - target
        if float(res.abs().max()) < 1e-13:
            break
        det = j00 * j11 - j01 * j01  # the Jacobian is symmetric
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        dx = (j11 * res[..., 0] - j01 * res[..., 1]) / det
        dy = (-j01 * res[..., 0] + j00 * res[..., 1]) / det
        xy = xy - torch.stack([dx, dy], dim=-1)
    return xy.to(dtype)


def _has_distortion(dist: Optional[torch.Tensor]) -> bool:
    return dist is not None and bool((dist.abs() > 0).any())


def undistort_pixels(xy: torch.Tensor, intrinsics: torch.Tensor, dist: Optional[torch.Tensor]) -> torch.Tensor:
    """Map pixel coordinates of a distorted image ``[..., 2]`` to the undistorted pinhole image.

    ``intrinsics`` is ``[3, 3]`` or per point ``[..., 3, 3]``; ``dist`` ``[4]`` or ``[..., 4]``.
    The undistorted image uses the same intrinsics (see module docstring). Returns the input
    unchanged (as float64) when ``dist`` is None or all zeros.
    """
    xy = xy.double()
    if not _has_distortion(dist):
        return xy
    k = intrinsics.double()
    fx, fy, cx, cy, s = k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2], k[..., 0, 1]
    yn = (xy[..., 1] - cy) / fy
    xn = (xy[..., 0] - cx - s * yn) / fx
    und = undistort_normalized(torch.stack([xn, yn], dim=-1), dist)
    u = fx * und[..., 0] + s * und[..., 1] + cx
    v = fy * und[..., 1] + cy
    return torch.stack([u, v], dim=-1)


def _undistort_grid(intrinsics: torch.Tensor, dist: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grid ``[1, H, W, 2]`` that resamples a distorted image into the pinhole one."""
    k = intrinsics.double()
    fx, fy, cx, cy, s = k[0, 0], k[1, 1], k[0, 2], k[1, 2], k[0, 1]
    v, u = torch.meshgrid(
        torch.arange(height, dtype=torch.float64) + 0.5, torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij"
    )
    yn = (v - cy) / fy
    xn = (u - cx - s * yn) / fx
    xd, yd = distort_normalized(torch.stack([xn, yn], dim=-1), dist.double()).unbind(-1)
    ud = fx * xd + s * yd + cx
    vd = fy * yd + cy
    # align_corners=False: -1 and +1 are the outer image borders, i.e. pixel coordinate 0 and W.
    grid = torch.stack([2 * ud / width - 1, 2 * vd / height - 1], dim=-1)
    return grid.float().unsqueeze(0)


# --------------------------------------------------------------------------------------------
# File readers
# --------------------------------------------------------------------------------------------


def read_image_size(path: Path) -> Size:
    """``(H, W)`` of an image file from its header; :class:`SceneError` naming the file if unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise SceneError(f"image file {path} does not exist") from None
    except Exception as err:  # PIL raises several types for corrupt headers
        raise SceneError(f"image file {path} is not a readable image ({type(err).__name__}: {err})") from err
    return int(h), int(w)


def read_image(path: Path) -> torch.Tensor:
    """RGB image ``[3, H, W]`` float32 in [0, 1]; :class:`SceneError` naming the file if missing/corrupt."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise SceneError(f"image file {path} does not exist") from None
    except Exception as err:
        raise SceneError(f"image file {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _read_array(path: Path, what: str) -> np.ndarray:
    from PIL import Image

    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with Image.open(path) as im:
            return np.array(im)
    except FileNotFoundError:
        raise SceneError(f"{what} file {path} does not exist") from None
    except Exception as err:
        raise SceneError(f"{what} file {path} is corrupt or unreadable ({type(err).__name__}: {err})") from err


def read_depth_file(path: Path, scale: float) -> torch.Tensor:
    """Depth map ``[H, W]`` float32 in scene units with NaN where invalid.

    16-bit PNGs (and integer ``.npy``) are raw units times ``scale``; 0 and 65535 are invalid.
    Float ``.npy`` files are multiplied by ``scale`` too; non-finite or non-positive are invalid.
    """
    raw = _read_array(path, "depth")
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 2:
        raise SceneError(f"depth file {path} must be a single-channel image, got shape {raw.shape}")
    if raw.dtype == np.uint8:
        raise SceneError(f"depth file {path} is 8-bit; depth must be 16-bit PNG (raw * depth_scale) or .npy")
    depth = raw.astype(np.float64)
    invalid = ~np.isfinite(depth) | (depth <= 0)
    if np.issubdtype(raw.dtype, np.integer):
        invalid |= raw == 65535
    depth = depth * scale
    depth[invalid] = np.nan
    return torch.from_numpy(depth.astype(np.float32))


def read_label_file(path: Path) -> torch.Tensor:
    """Integer label map ``[H, W]`` (int64), e.g. object ids with 0 = background."""
    raw = _read_array(path, "object-id")
    if raw.ndim != 2 or not np.issubdtype(raw.dtype, np.integer):
        raise SceneError(f"object-id file {path} must be a single-channel integer image, got {raw.dtype} {raw.shape}")
    return torch.from_numpy(raw.astype(np.int64))


def _resize(x: torch.Tensor, size: Size, mode: str) -> torch.Tensor:
    """Resize ``[C, H, W]``; bilinear uses antialiasing when shrinking (pixel-centre aligned)."""
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
            if not _has_distortion(self.distortion):
                self.distortion = None
        for key in ("depth_paths", "object_id_paths"):
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

    def check_files(self, check_depth: bool = True) -> None:
        """Check every image (and depth/label) file exists, is readable and has the stated size.

        Only file headers are read. Raises :class:`SceneError` naming the first bad file.
        """
        for i, path in enumerate(self.image_paths):
            size = read_image_size(path)
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
            h, w = (h // patch_size) * patch_size, (w // patch_size) * patch_size
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
        out = self.intrinsics[torch.tensor(idx, dtype=torch.long)].clone()
        for row, i in enumerate(idx):
            sx, sy = self.scale_factors(i, size)
            out[row, 0] *= sx
            out[row, 1] *= sy
        return out

    def scale_points(self, xy: torch.Tensor, view_index: int, size: Size) -> torch.Tensor:
        """Map original-pixel coordinates ``[..., 2]`` of one view to a ``size = (H', W')`` image."""
        sx, sy = self.scale_factors(view_index, size)
        return xy * torch.tensor([sx, sy], dtype=xy.dtype, device=xy.device)

    # ---------------------------------------------------------------- loading
    def _undistort_map(self, i: int, mode: str, x: torch.Tensor) -> torch.Tensor:
        if self.distortion is None or not _has_distortion(self.distortion[i]):
            return x
        h, w = x.shape[-2:]
        # keyed by the camera, not the view: views usually share one camera, so it is built once
        key = ("undistort_grid", tuple(self.intrinsics[i].flatten().tolist()), tuple(self.distortion[i].tolist()), h, w)
        grid = self._cache.get(key)
        if grid is None:
            grid = _undistort_grid(self.intrinsics[i], self.distortion[i], h, w)
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
        images = torch.stack([_resize(self.load_image(i), target, "bilinear").clamp(0, 1) for i in idx])
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
                m = _resize(m.float(), self.image_size(i), "nearest").to(m.dtype)
            m = self._undistort_map(i, "nearest", m.float()).to(m.dtype)
            out.append(_resize(m.float(), target, "nearest").to(m.dtype)[0])
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
