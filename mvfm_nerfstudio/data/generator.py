"""Procedural multi-view scenes with exact depth, written in Nerfstudio format.

A textured ground square with several objects (spheres, boxes, cylinders) on it, seen by
cameras on an orbit. Everything is procedural (no assets, no licensing questions) and
deterministic for a seed. The renderer is vectorised analytic ray casting in torch (float64):

* geometry: exact ray/primitive intersections; depth is the **z-depth in the OpenCV camera
  frame** (distance along the optical axis, what Nerfstudio's depth loss expects), not the
  ray length; background (sky) has invalid depth (raw 0);
* appearance: Lambertian shading with one fixed directional light and hard shadows, albedo
  from view-independent solid 3D textures (multi-scale value noise + coloured patterns
  evaluated at the 3D hit point, a distinct palette per object). A surface point therefore
  has the same colour in every view (up to pixel sampling), so learned features can match;
* cameras: orbit around the objects (azimuth stratified, random elevation within a range,
  radius and look-at jitter), pinhole, pixel centres at ``(col + 0.5, row + 0.5)``.

Output folder::

    transforms.json        OpenGL transform_matrix, fl_x/fl_y/cx/cy/w/h, camera_model PINHOLE,
                           per-frame depth_file_path + object_id_path, depth_unit_scale_factor
    images/frame_00000.png RGB
    depth/frame_00000.png  16-bit z-depth, metres = raw * depth_unit_scale_factor, 0 = no surface
    object_ids/frame_00000.png  8/16-bit object id (0 = sky, 1 = ground, 2.. = objects)
    normals/frame_00000.npy  float16 [H, W, 3] exact unit surface normals in the WORLD frame at the pixel
                           centre, facing the camera; NaN = no surface (per-frame ``normal_file_path``)
    objects.json           the objects (id, type, geometry, palette)
    sparse/0/              optional COLMAP model (PINHOLE, exact tracks of surface points)

The per-frame object-id key is ``object_id_path`` (NOT Nerfstudio's ``mask_path``, which
Nerfstudio would use as a loss mask).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import SceneError
from ..geometry.cameras import camera_rays, look_at, opencv_to_opengl, invert_pose, pixel_directions
from ..utils.runtime import single_threaded

__all__ = [
    "SceneGeneratorConfig",
    "SCENE_MARKER",
    "is_generated_scene",
    "ProceduralObject",
    "ProceduralScene",
    "build_scene",
    "orbit_cameras",
    "render_view",
    "make_scene",
    "tiny_config",
]

GENERATOR_VERSION = 2


@dataclass
class SceneGeneratorConfig:
    """Procedural scene generator (``mvfm-make-scene``): objects on a textured ground seen from an orbit."""

    num_views: int = 32
    """Number of cameras (views)."""
    height: int = 192
    """Image height in pixels."""
    width: int = 256
    """Image width in pixels."""
    seed: int = 0
    """Random seed; the same seed and config give byte-identical images and depth."""
    num_objects: int = 6
    """Number of objects (spheres, boxes, cylinders) placed on the ground."""
    object_types: Tuple[str, ...] = ("sphere", "box", "cylinder")
    """Object kinds to draw from (cycled, then shuffled)."""
    placement_radius: float = 1.8
    """Objects are placed within this distance of the origin (scene units, metres)."""
    ground_size: float = 7.0
    """Side length of the square textured ground centred at the origin."""
    fov_x_deg: float = 55.0
    """Horizontal field of view in degrees (square pixels, principal point at the image centre)."""
    orbit_radius: float = 4.5
    """Mean camera distance from the look-at point."""
    radius_jitter: float = 0.12
    """Relative random variation of each camera's distance (0.12 = +-12%)."""
    elevation_range_deg: Tuple[float, float] = (15.0, 50.0)
    """Camera elevation above the ground plane, drawn uniformly in this range (degrees)."""
    azimuth_jitter: float = 0.3
    """Random azimuth offset as a fraction of the spacing between consecutive cameras."""
    look_at_height: float = 0.4
    """Height of the orbit's look-at point above the ground."""
    look_at_jitter: float = 0.25
    """Random offset (per axis, +-) of each camera's look-at point."""
    light_direction: Tuple[float, float, float] = (0.5, 0.3, 1.0)
    """Direction towards the directional light (normalised)."""
    ambient: float = 0.35
    """Ambient light fraction (shadowed / back-facing surfaces keep this much of their albedo)."""
    shadows: bool = True
    """Cast hard shadows from the light (view-independent, like the texture)."""
    supersample: int = 3
    """Anti-aliasing: pixels on object boundaries get supersample x supersample colour samples
    (1 = off); depth and object ids always come from the pixel centre."""
    depth_unit_scale_factor: float = 1e-3
    """Metres per raw 16-bit depth unit (1e-3: millimetres up to 65.5 m, Nerfstudio's default, which its
    dataparser applies regardless of the value written to transforms.json)."""
    write_colmap: bool = True
    """Also write a COLMAP model (sparse/0) whose tracks are exact projections of surface points."""
    colmap_points_per_view: int = 150
    """Surface points seeded per view for the COLMAP tracks."""
    overwrite: bool = False
    """Replace an existing output folder, only if it is a scene this generator wrote (it holds the marker file
    .mvfm-generated-scene); any other non-empty folder is refused."""


def tiny_config(seed: int = 0, **overrides) -> SceneGeneratorConfig:
    """Small fast config for tests: 8 views of 96x128, no supersampling."""
    kw = dict(num_views=8, height=96, width=128, seed=seed, supersample=1, num_objects=5)
    kw.update(overrides)
    return SceneGeneratorConfig(**kw)


# --------------------------------------------------------------------------------------------
# Solid textures
# --------------------------------------------------------------------------------------------


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    h = (h % 1.0) * 6
    i = np.floor(h).astype(int) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [row[c] for row in table]) for c in range(3)], axis=-1)


class ValueNoise:
    """Seeded 3D value noise on an integer lattice with smoothstep interpolation."""

    def __init__(self, rng: np.random.Generator, table_size: int = 4096):
        self.size = table_size  # power of two
        self.values = torch.from_numpy(rng.random(table_size))

    def _hash(self, ix: torch.Tensor, iy: torch.Tensor, iz: torch.Tensor) -> torch.Tensor:
        # spatial hash of the lattice corner (large primes), one table lookup
        h = (ix * 73856093) ^ (iy * 19349663) ^ (iz * 83492791)
        return self.values[h & (self.size - 1)]

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        """Noise in [0, 1] at points ``[R, 3]``."""
        base = torch.floor(p)
        f = p - base
        f = f * f * (3 - 2 * f)
        i = base.long()
        out = torch.zeros(p.shape[0], dtype=p.dtype)
        for dx in (0, 1):
            wx = f[:, 0] if dx else 1 - f[:, 0]
            for dy in (0, 1):
                wy = f[:, 1] if dy else 1 - f[:, 1]
                for dz in (0, 1):
                    wz = f[:, 2] if dz else 1 - f[:, 2]
                    out = out + wx * wy * wz * self._hash(i[:, 0] + dx, i[:, 1] + dy, i[:, 2] + dz)
        return out

    def fbm(self, p: torch.Tensor, octaves: int = 4) -> torch.Tensor:
        """Fractal sum of ``octaves`` noise layers (frequency x2, amplitude x0.5), in [0, 1]."""
        total, amp, norm = torch.zeros(p.shape[0], dtype=p.dtype), 1.0, 0.0
        for o in range(octaves):
            total = total + amp * self(p * (2.0**o) + 17.3 * o)
            norm += amp
            amp *= 0.5
        return total / norm


@dataclass
class Texture:
    """Solid texture: a 4-colour palette and a pattern evaluated at world-space points."""

    palette: np.ndarray  # [4, 3] RGB in [0, 1]
    pattern: str  # "marble" | "stripes" | "checker" | "spots" | "tiles"
    frequency: float
    offset: np.ndarray  # [3]
    axis: np.ndarray  # [3] unit, for stripes

    def __call__(self, p: torch.Tensor, noise: ValueNoise) -> torch.Tensor:
        """Albedo ``[R, 3]`` at world points ``p [R, 3]``."""
        q = p * self.frequency + torch.from_numpy(self.offset)
        pal = torch.from_numpy(self.palette)
        low = noise.fbm(q * 0.5, 3)
        detail = noise.fbm(q * 4.0 + 31.7, 3)
        if self.pattern == "marble":
            # smooth walk through the palette driven by low-frequency noise
            x = (low * 1.6 - 0.3).clamp(0, 1) * 3
            i0 = x.floor().long().clamp(max=2)
            w = (x - i0).unsqueeze(-1)
            col = pal[i0] * (1 - w) + pal[i0 + 1] * w
        elif self.pattern == "stripes":
            s = torch.sin(2 * math.pi * (q @ torch.from_numpy(self.axis) + 2.5 * low))
            band = (s > 0).long() + 2 * (torch.sin(math.pi * (q @ torch.from_numpy(self.axis)) + 1.3) > 0.6).long()
            col = pal[band]
        elif self.pattern == "checker":
            cell = torch.floor(q + 0.35 * (low.unsqueeze(-1) - 0.5)).long().sum(-1)
            col = pal[(cell % 2) + 2 * (noise(torch.floor(q) * 1.7 + 5.1) > 0.55).long()]
        elif self.pattern == "spots":
            v = noise(q * 2.0 + 11.1)
            col = torch.where((v > 0.62).unsqueeze(-1), pal[1], pal[0])
            col = torch.where((v < 0.25).unsqueeze(-1), pal[2], col)
            col = torch.where((low > 0.68).unsqueeze(-1), pal[3], col)
        elif self.pattern == "tiles":
            cell = torch.floor(q[:, :2])
            frac = q[:, :2] - cell
            grout = ((frac < 0.06) | (frac > 0.94)).any(-1)
            pick = (noise(torch.cat([cell, torch.zeros_like(cell[:, :1])], -1) * 1.31 + 3.3) * 3.999).long()
            col = torch.where(grout.unsqueeze(-1), pal[3] * 0.5, pal[pick.clamp(max=2)])
        else:
            raise ValueError(f"unknown texture pattern {self.pattern!r}")
        return (col * (0.7 + 0.6 * (detail.unsqueeze(-1) - 0.5))).clamp(0, 1)


def _random_texture(rng: np.random.Generator, pattern: str, hue: float) -> Texture:
    hues = hue + np.array([0.0, 0.07, 0.45, 0.55]) + rng.uniform(-0.03, 0.03, 4)
    sats = rng.uniform(0.45, 0.9, 4)
    vals = np.array([0.9, 0.55, 0.8, 0.35]) * rng.uniform(0.85, 1.1, 4)
    palette = _hsv_to_rgb(hues, sats, np.clip(vals, 0, 1))
    axis = rng.normal(size=3)
    return Texture(
        palette=palette, pattern=pattern, frequency=float(rng.uniform(2.0, 4.0)),
        offset=rng.uniform(0, 100, 3), axis=axis / np.linalg.norm(axis),
    )


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

_EPS = 1e-7


@dataclass
class ProceduralObject:
    """One primitive. ``center`` is the sphere/box centre or the cylinder's base centre."""

    id: int
    kind: str  # "sphere" | "box" | "cylinder" | "ground"
    center: np.ndarray
    size: np.ndarray  # sphere: [r]; box: half extents [3]; cylinder: [r, height]; ground: [half side]
    angle: float  # rotation about the vertical axis (boxes)
    texture: Texture

    def intersect(self, o: torch.Tensor, d: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest hit ``t [R]`` (inf if none, only t > eps) and unit normal ``[R, 3]`` for rays ``o, d [R, 3]``."""
        c = torch.from_numpy(self.center)
        inf = torch.full(o.shape[:1], math.inf, dtype=o.dtype)
        if self.kind == "sphere":
            r = float(self.size[0])
            oc = o - c
            b = (oc * d).sum(-1)
            disc = b * b - ((oc * oc).sum(-1) - r * r)
            sq = disc.clamp(min=0).sqrt()
            t = torch.where(-b - sq > _EPS, -b - sq, -b + sq)
            t = torch.where((disc >= 0) & (t > _EPS), t, inf)
            n = (o + t.nan_to_num(posinf=0).unsqueeze(-1) * d - c) / r
            return t, n
        if self.kind == "ground":
            half = float(self.size[0])
            t = torch.where(d[:, 2] < -1e-12, -o[:, 2] / d[:, 2].clamp(max=-1e-12), inf)
            hit = o + t.nan_to_num(posinf=0).unsqueeze(-1) * d
            inside = (hit[:, 0].abs() <= half) & (hit[:, 1].abs() <= half) & (t > _EPS)
            n = torch.zeros_like(o)
            n[:, 2] = 1
            return torch.where(inside, t, inf), n
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        rot = torch.tensor([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]], dtype=o.dtype)  # local -> world
        lo = (o - c) @ rot
        ld = d @ rot
        if self.kind == "box":
            h = torch.from_numpy(self.size)
            safe = torch.where(ld.abs() < 1e-12, torch.full_like(ld, 1e-12), ld)
            t1, t2 = (-h - lo) / safe, (h - lo) / safe
            tmin, tmax = torch.minimum(t1, t2), torch.maximum(t1, t2)
            tn, axis = tmin.max(-1)
            tf = tmax.min(-1).values
            t = torch.where((tn <= tf) & (tn > _EPS), tn, inf)
            nl = torch.zeros_like(lo)
            nl.scatter_(1, axis.unsqueeze(-1), -torch.sign(ld.gather(1, axis.unsqueeze(-1))))
            return t, nl @ rot.T
        if self.kind == "cylinder":
            r, height = float(self.size[0]), float(self.size[1])
            a = ld[:, 0] ** 2 + ld[:, 1] ** 2
            b = 2 * (lo[:, 0] * ld[:, 0] + lo[:, 1] * ld[:, 1])
            cc = lo[:, 0] ** 2 + lo[:, 1] ** 2 - r * r
            disc = b * b - 4 * a * cc
            t_side = (-b - disc.clamp(min=0).sqrt()) / (2 * a.clamp(min=1e-12))
            z_side = lo[:, 2] + t_side * ld[:, 2]
            ok_side = (disc >= 0) & (a > 1e-12) & (t_side > _EPS) & (z_side >= 0) & (z_side <= height)
            t_side = torch.where(ok_side, t_side, inf)
            t_cap = torch.where(ld[:, 2].abs() > 1e-12, (height - lo[:, 2]) / ld[:, 2], inf)
            cap_xy = lo[:, :2] + t_cap.nan_to_num(posinf=0).unsqueeze(-1) * ld[:, :2]
            ok_cap = (t_cap > _EPS) & ((cap_xy**2).sum(-1) <= r * r) & (lo[:, 2] > height)
            t_cap = torch.where(ok_cap, t_cap, inf)
            use_cap = t_cap < t_side
            t = torch.minimum(t_side, t_cap)
            hit = lo + t.nan_to_num(posinf=0).unsqueeze(-1) * ld
            n_side = torch.stack([hit[:, 0] / r, hit[:, 1] / r, torch.zeros_like(hit[:, 0])], -1)
            n_cap = torch.zeros_like(hit)
            n_cap[:, 2] = 1
            nl = torch.where(use_cap.unsqueeze(-1), n_cap, n_side)
            return t, nl @ rot.T
        raise ValueError(f"unknown object kind {self.kind!r}")

    def to_json(self) -> dict:
        return {
            "id": self.id, "name": f"{self.kind}_{self.id}", "type": self.kind,
            "center": self.center.tolist(), "size": self.size.tolist(), "angle_rad": self.angle,
            "texture": {"pattern": self.texture.pattern, "palette": self.texture.palette.round(4).tolist(),
                        "frequency": self.texture.frequency},
        }


@dataclass
class ProceduralScene:
    """Objects (id 1 = ground), a light and the texture noise: everything needed to render."""

    objects: List[ProceduralObject]
    light: np.ndarray
    ambient: float
    shadows: bool
    noise: ValueNoise = field(repr=False)

    def cast(self, o: torch.Tensor, d: torch.Tensor, skip_ground: bool = False):
        """Nearest hit over all objects: ``(t [R], normal [R, 3], object id [R] (0 = none))``."""
        t_best = torch.full(o.shape[:1], math.inf, dtype=o.dtype)
        n_best = torch.zeros_like(o)
        id_best = torch.zeros(o.shape[:1], dtype=torch.long)
        for obj in self.objects:
            if skip_ground and obj.kind == "ground":
                continue
            t, n = obj.intersect(o, d)
            closer = t < t_best
            t_best = torch.where(closer, t, t_best)
            n_best = torch.where(closer.unsqueeze(-1), n, n_best)
            id_best = torch.where(closer, torch.full_like(id_best, obj.id), id_best)
        return t_best, n_best, id_best

    def shade(self, o: torch.Tensor, d: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Trace rays: ``rgb [R, 3]``, ``t [R]`` (inf = sky), ``ids [R]``, ``points [R, 3]``, ``normals [R, 3]``
        (unit, facing the ray origin; NaN for sky)."""
        t, n, ids = self.cast(o, d)
        hit = ids > 0
        pts = o + t.nan_to_num(posinf=0).unsqueeze(-1) * d
        normals = torch.full_like(d, math.nan)
        # sky: a gradient by ray elevation (at infinity, so view-consistent)
        up = d[:, 2].clamp(-1, 1).unsqueeze(-1)
        rgb = torch.tensor([0.78, 0.84, 0.92], dtype=o.dtype) * (1 - up.clamp(min=0)) + torch.tensor(
            [0.35, 0.5, 0.8], dtype=o.dtype
        ) * up.clamp(min=0)
        if hit.any():
            hp, hn, hid = pts[hit], n[hit], ids[hit]
            # normals face the ray origin side (inside views never happen, but be safe)
            hn = torch.where(((hn * d[hit]).sum(-1) > 0).unsqueeze(-1), -hn, hn)
            normals[hit] = hn
            light = torch.from_numpy(self.light)
            lambert = (hn @ light).clamp(min=0)
            if self.shadows:
                t_sh, _, _ = self.cast(hp + 1e-6 * hn, light.expand_as(hp).contiguous(), skip_ground=True)
                lambert = torch.where(torch.isfinite(t_sh), torch.zeros_like(lambert), lambert)
            albedo = torch.zeros_like(hp)
            for obj in self.objects:
                m = hid == obj.id
                if m.any():
                    albedo[m] = obj.texture(hp[m], self.noise)
            rgb[hit] = albedo * (self.ambient + (1 - self.ambient) * lambert).unsqueeze(-1)
        return {"rgb": rgb.clamp(0, 1), "t": torch.where(hit, t, torch.full_like(t, math.inf)), "ids": ids,
                "points": pts, "normals": normals}


def build_scene(config: SceneGeneratorConfig) -> ProceduralScene:
    """Random objects on the ground (non-overlapping footprints), textures and light for ``config.seed``."""
    if config.num_objects < 1:
        raise SceneError(f"num_objects must be >= 1, got {config.num_objects}")
    rng = np.random.default_rng(config.seed)
    noise = ValueNoise(rng)
    ground_tex = _random_texture(rng, "tiles", hue=rng.uniform())
    ground_tex.frequency = 1.6
    objects = [ProceduralObject(1, "ground", np.zeros(3), np.array([config.ground_size / 2]), 0.0, ground_tex)]
    kinds = [config.object_types[i % len(config.object_types)] for i in range(config.num_objects)]
    rng.shuffle(kinds)
    patterns = ["marble", "stripes", "checker", "spots"]
    hues = (rng.uniform() + np.arange(config.num_objects) / config.num_objects) % 1.0
    rng.shuffle(hues)
    placed: List[Tuple[np.ndarray, float]] = []
    for k, kind in enumerate(kinds):
        if kind == "sphere":
            size = np.array([rng.uniform(0.3, 0.6)])
            foot = size[0]
        elif kind == "box":
            size = rng.uniform(0.2, 0.5, 3)
            foot = float(np.linalg.norm(size[:2]))
        elif kind == "cylinder":
            size = np.array([rng.uniform(0.2, 0.4), rng.uniform(0.5, 1.3)])
            foot = size[0]
        else:
            raise SceneError(f"unknown object type {kind!r} (use sphere, box, cylinder)")
        for _ in range(500):
            r = config.placement_radius * math.sqrt(rng.uniform())
            a = rng.uniform(0, 2 * math.pi)
            xy = np.array([r * math.cos(a), r * math.sin(a)])
            if all(np.linalg.norm(xy - p) > foot + f + 0.08 for p, f in placed):
                break
        else:
            raise SceneError(
                f"could not place {config.num_objects} objects without overlap within placement_radius="
                f"{config.placement_radius}; use fewer objects or a larger radius"
            )
        placed.append((xy, foot))
        if kind == "sphere":
            z = size[0] + (rng.uniform(0, 0.4) if rng.uniform() < 0.3 else 0.0)  # some float
        elif kind == "box":
            z = size[2]
        else:
            z = 0.0
        tex = _random_texture(rng, patterns[k % len(patterns)], hues[k])
        objects.append(ProceduralObject(k + 2, kind, np.array([xy[0], xy[1], z]), size, rng.uniform(0, math.pi), tex))
    light = np.asarray(config.light_direction, dtype=np.float64)
    return ProceduralScene(objects, light / np.linalg.norm(light), config.ambient, config.shadows, noise)


def orbit_cameras(config: SceneGeneratorConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(intrinsics [3, 3], cam_to_world [N, 4, 4])`` float64, OpenCV, for ``config`` (seeded)."""
    if config.num_views < 1:
        raise SceneError(f"num_views must be >= 1, got {config.num_views}")
    if config.height < 8 or config.width < 8:
        raise SceneError(f"image size must be at least 8x8, got {config.height}x{config.width}")
    lo, hi = config.elevation_range_deg
    if not -89 < lo <= hi < 89:
        raise SceneError(f"elevation_range_deg must satisfy -89 < low <= high < 89, got {config.elevation_range_deg}")
    rng = np.random.default_rng(config.seed + 7919)
    focal = 0.5 * config.width / math.tan(math.radians(config.fov_x_deg) / 2)
    k = torch.tensor([[focal, 0, config.width / 2], [0, focal, config.height / 2], [0, 0, 1]], dtype=torch.float64)
    base = np.array([0.0, 0.0, config.look_at_height])
    poses = []
    phase = rng.uniform(0, 2 * math.pi)
    for i in range(config.num_views):
        az = phase + 2 * math.pi * (i + config.azimuth_jitter * rng.uniform(-0.5, 0.5)) / config.num_views
        el = math.radians(rng.uniform(lo, hi))
        r = config.orbit_radius * (1 + config.radius_jitter * rng.uniform(-1, 1))
        target = base + config.look_at_jitter * rng.uniform(-1, 1, 3)
        center = base + r * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        poses.append(look_at(torch.from_numpy(center), torch.from_numpy(target)))
    return k, torch.stack(poses)


def render_view(
    scene: ProceduralScene, intrinsics: torch.Tensor, cam_to_world: torch.Tensor, height: int, width: int,
    supersample: int = 1, chunk: int = 65536,
) -> Dict[str, torch.Tensor]:
    """Render one pinhole view (OpenCV ``cam_to_world``, float64).

    Returns:
        ``rgb [H, W, 3]`` float in [0, 1] (mean of ``supersample**2`` sub-pixel samples),
        ``depth [H, W]`` z-depth at the pixel centre (inf where no surface), ``ids [H, W]``
        long object id at the pixel centre (0 = sky), ``points [H, W, 3]`` world hit points, ``normals [H, W, 3]``
        exact world-frame unit normals at the pixel centre facing the camera (NaN where no surface).
    """
    with single_threaded():
        return _render_view(scene, intrinsics.double(), cam_to_world.double(), height, width, supersample, chunk)


def _render_view(
    scene: ProceduralScene, k: torch.Tensor, c2w: torch.Tensor, height: int, width: int, supersample: int, chunk: int
) -> Dict[str, torch.Tensor]:
    origins, dirs = camera_rays(k, c2w, height, width)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    outs = [scene.shade(o[s:s + chunk], d[s:s + chunk]) for s in range(0, o.shape[0], chunk)]
    centre = {key: torch.cat([x[key] for x in outs]) for key in outs[0]}
    forward = c2w[:3, 2]
    depth = centre["t"] * (d @ forward)  # ray length -> z-depth along the optical axis
    rgb = centre["rgb"]
    if supersample > 1:
        # Anti-alias where aliasing is worst, at object boundaries: pixels whose object id differs
        # from a 4-neighbour get supersample**2 sub-pixel colour samples (a regular grid).
        ids = centre["ids"].reshape(height, width)
        edge = torch.zeros_like(ids, dtype=torch.bool)
        edge[1:] |= ids[1:] != ids[:-1]
        edge[:-1] |= ids[1:] != ids[:-1]
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        edge[:, :-1] |= ids[:, 1:] != ids[:, :-1]
        rows, cols = edge.nonzero(as_tuple=True)
        if len(rows):
            s = supersample
            offs = (torch.arange(s, dtype=torch.float64) + 0.5) / s
            oy, ox = torch.meshgrid(offs, offs, indexing="ij")
            u = (cols.double().unsqueeze(-1) + ox.flatten()).flatten()
            v = (rows.double().unsqueeze(-1) + oy.flatten()).flatten()
            d2 = pixel_directions(torch.stack([u, v], -1), k, c2w)
            d2 = d2 / d2.norm(dim=-1, keepdim=True)
            o2 = c2w[:3, 3].expand_as(d2)
            sub = torch.cat([scene.shade(o2[i:i + chunk], d2[i:i + chunk])["rgb"] for i in range(0, d2.shape[0], chunk)])
            rgb = rgb.clone()
            rgb[rows * width + cols] = sub.reshape(-1, s * s, 3).mean(1)
    return {
        "rgb": rgb.reshape(height, width, 3),
        "depth": depth.reshape(height, width),
        "ids": centre["ids"].reshape(height, width),
        "points": centre["points"].reshape(height, width, 3),
        "normals": centre["normals"].reshape(height, width, 3),
    }


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def _colmap_tracks(
    renders: List[Dict[str, torch.Tensor]], k: torch.Tensor, c2w: torch.Tensor, rng: np.random.Generator,
    per_view: int,
) -> List[Tuple[np.ndarray, np.ndarray, List[Tuple[int, np.ndarray]]]]:
    """Exact tracks: surface points seeded per view, observed where they project unoccluded."""
    from .correspondences import project_points

    n = len(renders)
    h, w = renders[0]["depth"].shape
    points = []
    for i, r in enumerate(renders):
        valid = (r["ids"].flatten() > 0).nonzero().flatten().numpy()
        if len(valid) == 0:
            continue
        pick = rng.choice(valid, size=min(per_view, len(valid)), replace=False)
        # the exact surface points under the chosen pixel centres
        points.append((r["points"].reshape(-1, 3)[torch.from_numpy(pick)], r["rgb"].reshape(-1, 3)[torch.from_numpy(pick)]))
    if not points:
        return []
    xyz = torch.cat([p for p, _ in points])
    rgb = torch.cat([c for _, c in points])
    obs: List[List[Tuple[int, np.ndarray]]] = [[] for _ in range(xyz.shape[0])]
    for j in range(n):
        xy, z = project_points(xyz, k, c2w[j])
        inside = (z > 1e-9) & (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
        col = xy[:, 0].floor().long().clamp(0, w - 1)
        row = xy[:, 1].floor().long().clamp(0, h - 1)
        d = renders[j]["depth"][row, col]
        # visible when the nearest pixel sees (almost) the same depth: occluded points are far off
        visible = inside & torch.isfinite(d) & ((z - d).abs() <= 0.01 * d)
        for p in visible.nonzero().flatten().tolist():
            obs[p].append((j, xy[p].numpy()))
    return [(xyz[p].numpy(), rgb[p].numpy(), o) for p, o in enumerate(obs) if len(o) >= 2]


def _write_colmap(out: Path, k: torch.Tensor, c2w: torch.Tensor, h: int, w: int, names: List[str], tracks) -> None:
    import pycolmap

    rec = pycolmap.Reconstruction()
    cam = pycolmap.Camera(
        model="PINHOLE", width=w, height=h,
        params=[float(k[0, 0]), float(k[1, 1]), float(k[0, 2]), float(k[1, 2])], camera_id=1,
    )
    rec.add_camera_with_trivial_rig(cam)
    per_image: List[List[np.ndarray]] = [[] for _ in names]
    elements: List[List[Tuple[int, int]]] = []
    for _, _, obs in tracks:
        el = []
        for j, xy in obs:
            el.append((j, len(per_image[j])))
            per_image[j].append(xy)
        elements.append(el)
    for j, name in enumerate(names):
        kp = np.asarray(per_image[j], dtype=np.float64).reshape(-1, 2)
        image = pycolmap.Image(name=name, keypoints=kp, camera_id=1, image_id=j + 1)
        w2c = invert_pose(c2w[j]).numpy()
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(w2c[:3, :4]))
    for (xyz, rgb, _), el in zip(tracks, elements):
        track = pycolmap.Track([pycolmap.TrackElement(j + 1, idx) for j, idx in el])
        rec.add_point3D(np.asarray(xyz, dtype=np.float64), track, (np.asarray(rgb) * 255).round().astype(np.uint8))
    out.mkdir(parents=True, exist_ok=True)
    rec.write(str(out))


def make_scene(config: SceneGeneratorConfig, output_dir: os.PathLike, progress: bool = True) -> Path:
    """Render ``config`` into a Nerfstudio scene folder ``output_dir`` and return its path.

    The folder is built in a temporary sibling and moved into place at the end, so readers
    never see a half-written scene. Raises :class:`SceneError` if ``output_dir`` exists and is
    not empty (unless ``config.overwrite``).
    """
    with single_threaded():
        return _make_scene(config, Path(output_dir), progress)


SCENE_MARKER = ".mvfm-generated-scene"
"""File the generator writes into every scene folder: ``overwrite`` replaces only folders holding it."""


def is_generated_scene(folder: Path) -> bool:
    """Whether ``folder`` is a scene this generator wrote (the marker file, or for scenes written before the marker
    existed, a transforms.json with the generator's ``mvfm_generator`` record)."""
    folder = Path(folder)
    if (folder / SCENE_MARKER).is_file():
        return True
    try:
        return "mvfm_generator" in json.loads((folder / "transforms.json").read_text())
    except (OSError, ValueError):
        return False


def _make_scene(config: SceneGeneratorConfig, output_dir: Path, progress: bool) -> Path:
    if output_dir.exists() and not output_dir.is_dir():
        raise SceneError(f"output folder {output_dir} is a file")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not config.overwrite:
            raise SceneError(f"output folder {output_dir} exists and is not empty; pass overwrite=True (--overwrite) "
                             "to replace a scene generated there")
        if not is_generated_scene(output_dir):
            raise SceneError(f"--overwrite refused: {output_dir} is not a scene written by mvfm-make-scene (no "
                             f"{SCENE_MARKER} file); it is left untouched. Choose an empty or new --output-dir")
    if config.supersample < 1:
        raise SceneError(f"supersample must be >= 1, got {config.supersample}")
    scene = build_scene(config)
    k, c2w = orbit_cameras(config)
    h, w = config.height, config.width
    max_raw = 65534
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        for sub in ("images", "depth", "object_ids", "normals"):
            (tmp / sub).mkdir()
        frames, renders, names = [], [], []
        task_iter = range(config.num_views)
        if progress:
            from rich.progress import track

            task_iter = track(task_iter, description=f"Rendering {config.num_views} views", transient=True)
        for i in task_iter:
            r = render_view(scene, k, c2w[i], h, w, supersample=config.supersample)
            name = f"frame_{i:05d}.png"
            rgb = (r["rgb"].numpy() * 255).round().astype(np.uint8)
            depth = r["depth"].numpy()
            finite = np.isfinite(depth)
            raw = np.zeros((h, w), dtype=np.uint16)
            if finite.any():
                dmax = float(depth[finite].max())
                if dmax / config.depth_unit_scale_factor > max_raw:
                    raise SceneError(
                        f"depth up to {dmax:.2f} does not fit 16 bits with depth_unit_scale_factor="
                        f"{config.depth_unit_scale_factor}; increase it to >= {dmax / max_raw:.2e}"
                    )
                raw[finite] = np.clip(np.round(depth[finite] / config.depth_unit_scale_factor), 1, max_raw)
            ids = r["ids"].numpy()
            ids = ids.astype(np.uint8 if ids.max() < 256 else np.uint16)
            _save_png(tmp / "images" / name, rgb)
            _save_png(tmp / "depth" / name, raw)
            _save_png(tmp / "object_ids" / name, ids)
            normal_name = f"frame_{i:05d}.npy"
            np.save(tmp / "normals" / normal_name, r["normals"].numpy().astype(np.float16))
            frames.append({
                "file_path": f"images/{name}",
                "transform_matrix": opencv_to_opengl(c2w[i]).tolist(),
                "depth_file_path": f"depth/{name}",
                "object_id_path": f"object_ids/{name}",
                "normal_file_path": f"normals/{normal_name}",
            })
            names.append(name)
            if config.write_colmap:
                renders.append({"depth": r["depth"], "ids": r["ids"], "points": r["points"], "rgb": r["rgb"]})
        transforms = {
            "camera_model": "PINHOLE",
            "w": w, "h": h,
            "fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]), "cx": float(k[0, 2]), "cy": float(k[1, 2]),
            "depth_unit_scale_factor": config.depth_unit_scale_factor,
            # the COLMAP model (if any) is in this same world frame
            "applied_transform": [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
            "frames": frames,
            "mvfm_generator": {"version": GENERATOR_VERSION, "config": asdict(config),
                               "depth": "z-depth in the OpenCV camera frame (metres = raw * depth_unit_scale_factor)",
                               "normals": "float16 [H, W, 3] world-frame unit normals facing the camera, NaN = sky"},
        }
        (tmp / "transforms.json").write_text(json.dumps(transforms, indent=1))
        objects = {"background_id": 0, "objects": [o.to_json() for o in scene.objects],
                   "light_direction": scene.light.tolist()}
        (tmp / "objects.json").write_text(json.dumps(objects, indent=1))
        (tmp / SCENE_MARKER).write_text("written by mvfm-make-scene; --overwrite may replace this folder\n")
        if config.write_colmap:
            rng = np.random.default_rng(config.seed + 104729)
            tracks = _colmap_tracks(renders, k, c2w, rng, config.colmap_points_per_view)
            _write_colmap(tmp / "sparse" / "0", k, c2w, h, w, [f"frame_{i:05d}.png" for i in range(len(names))],
                          tracks)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output_dir

