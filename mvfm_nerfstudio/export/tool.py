"""``mvfm-export``'s subcommands: ``pointcloud``, ``segment``, ``views`` (configuration and the runs).

Outputs (in ``--output-dir``; positions in the model's world frame, see :mod:`.points`):

* ``pointcloud``: ``pointcloud.ply`` (``x y z red green blue`` + where each point came from),
  ``pointcloud_features.npy`` (``[N, D]``, row ``i`` = vertex ``i``), ``pointcloud.json``.
* ``segment``: for ``mvfm-splat`` ``segment.ply``, a standard 3DGS file of the Gaussians whose feature has cosine
  similarity ``>= threshold`` with the query (and opacity ``>= --min-opacity``), with ``segment_features.npy``
  and ``segment_gaussians.npy`` (their indices in the run); for ``mvfm-features`` ``segment.ply``, the surface
  points above the threshold, with ``segment_features.npy``. Both: ``segment.json``, ``query_feature.safetensors``.
* ``views``: per rendered view ``<name>``: ``features/<name>.npy`` (``[H, W, D]`` float16), ``pca/<name>.png``,
  ``rgb/<name>.png`` and, with a query, ``similarity/<name>.png`` (turbo over the run's similarity range),
  ``similarity/<name>.npy`` (cosine, float32), ``masks/<name>.png`` (255 = segment); ``views.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple

import numpy as np
import torch

from ..segmentation.images import heatmap, save_png
from ..segmentation.masks import pooled_otsu_threshold
from ..utils.io import atomic_write
from .ply import write_features, write_gaussian_ply, write_point_ply
from .points import (FeaturePoints, finite, gaussian_points, nonempty, opacities, render_view, surface_points,
                     voxel_downsample)
from .query import QueryOptions, ResolvedQuery, resolve_query, save_resolved_query
from .run import LoadedRun, RunError, load_run

__all__ = ["ExportPointCloud", "ExportSegment", "ExportViews", "choose_threshold", "Commands", "RunError"]


@dataclass
class _RunOptions:
    load_config: Path
    """The trained run's config.yml (outputs/<experiment>/mvfm-features|mvfm-splat/<timestamp>/config.yml)."""
    output_dir: Path = Path("exports")
    """Where the files go (created)."""
    data: Optional[Path] = None
    """The scene folder, if it moved since training (default: the path in config.yml)."""
    device: str = "auto"
    """Where to render: 'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""

    def load(self) -> LoadedRun:
        return load_run(self.load_config, self.device, self.data)


@dataclass
class _PointOptions:
    views: Optional[List[int]] = None
    """mvfm-features: training views to take surface points from (default: all)."""
    view_stride: int = 1
    """mvfm-features: use every this-many-th of those views."""
    downscale: float = 2.0
    """mvfm-features: render the views at 1/downscale of their resolution (one point per rendered pixel)."""
    min_accumulation: float = 0.5
    """mvfm-features: keep pixels whose accumulated opacity is at least this (rays that hit a surface)."""
    min_opacity: float = 1 / 255
    """mvfm-splat: keep Gaussians with at least this opacity (1/255: what gsplat's CUDA rasteriser skips below)."""
    voxel_size: Optional[float] = None
    """Pool points into voxels of this side (model-frame world units): mean position, feature and colour per voxel.
    None = no pooling."""
    colors: Literal["pca", "rgb"] = "pca"
    """Point colours: 'pca' (the run's fixed display basis of the features, as feature_pca in the viewer) or 'rgb'
    (rendered colour; base colour of each Gaussian)."""
    feature_dtype: Literal["float16", "float32"] = "float16"
    """Precision of the companion feature array (.npy)."""
    ply_features: bool = False
    """Also store each point's feature as float ply properties feature_0..feature_{D-1} (bigger files)."""


def _points(run: LoadedRun, opts: _PointOptions) -> FeaturePoints:
    """All candidate points of the run (surface points or Gaussians), finite, before voxel pooling."""
    model = run.model
    if run.is_splat:
        pts = gaussian_points(model)
        keep = finite(pts) & (opacities(model) >= opts.min_opacity)
        return nonempty(pts.select(keep), "the run's set of Gaussians", f"lower --min-opacity ({opts.min_opacity:g})")
    n = len(run.train_cameras)
    views = list(range(n)) if opts.views is None else [int(v) for v in opts.views]
    bad = [v for v in views if not 0 <= v < n]
    if bad:
        raise ValueError(f"--views {bad} out of range: the run has {n} training views (0..{n - 1})")
    if opts.view_stride < 1:
        raise ValueError(f"--view-stride must be >= 1, got {opts.view_stride}")
    pts = surface_points(model, run.train_cameras, views[:: opts.view_stride], opts.downscale, opts.min_accumulation)
    return nonempty(pts.select(finite(pts)), "the rendered surface",
                    f"no pixel reached accumulation {opts.min_accumulation:g}; lower --min-accumulation")


def _colours(run: LoadedRun, pts: FeaturePoints, mode: str) -> torch.Tensor:
    return run.model.feature_display.basis.to_rgb(pts.features) if mode == "pca" else pts.rgb


def _write_points(run: LoadedRun, pts: FeaturePoints, opts: _PointOptions, out: Path, stem: str,
                  info: Dict[str, object]) -> Dict[str, object]:
    """``<stem>.ply`` + ``<stem>_features.npy`` + ``<stem>.json``; returns the summary."""
    if opts.voxel_size is not None:
        pts = voxel_downsample(pts, opts.voxel_size)
    comments = [f"mvfm-export {run.method} {run.config_path}", "frame: Nerfstudio dataparser-normalised (model) frame",
                f"features: {stem}_features.npy row i = vertex i"]
    write_point_ply(out / f"{stem}.ply", pts.positions, _colours(run, pts, opts.colors), pts.index,
                    pts.features if opts.ply_features else None, comments)
    write_features(out / f"{stem}_features.npy", pts.features, opts.feature_dtype)
    summary = {"method": run.method, "run": str(run.config_path), "checkpoint": str(run.checkpoint), "step": run.step,
               "points": len(pts), "feature_dim": int(pts.features.shape[1]), "ply": f"{stem}.ply",
               "features": f"{stem}_features.npy", "feature_dtype": opts.feature_dtype, "colors": opts.colors,
               "index_properties": sorted(pts.index), "voxel_size": opts.voxel_size,
               "frame": "Nerfstudio dataparser-normalised (model) frame; dataparser_transforms.json maps it back",
               "feature_cache": str(run.feature_store.path), **info}
    atomic_write(out / f"{stem}.json", json.dumps(summary, indent=1).encode())
    return summary


def choose_threshold(score: torch.Tensor, threshold: Optional[float], bins: int = 512,
                     value_range: Tuple[float, float] = (-1.0, 1.0), name: str = "similarity") -> Tuple[float, str]:
    """``(threshold, mode)``: the given threshold (``"fixed"``, checked against ``value_range``) or Otsu's on the
    histogram of the finite values of ``score`` (any shape) with ``bins`` equal bins over their range (``"otsu"``,
    :func:`~mvfm_nerfstudio.segmentation.masks.pooled_otsu_threshold`)."""
    lo, hi = value_range
    if threshold is not None:
        if not lo <= threshold <= hi:
            raise ValueError(f"--threshold is a {name} in [{lo:g}, {hi:g}], got {threshold}")
        return float(threshold), "fixed"
    values = score.double().flatten()
    values = values[torch.isfinite(values)]
    if not values.numel():
        raise ValueError(f"no finite {name} to threshold: the features or the query are not finite")
    return pooled_otsu_threshold([values], float(values.min()), float(values.max()), bins), "otsu"


def _threshold_for(query: ResolvedQuery, score: torch.Tensor, threshold: Optional[float]) -> Tuple[float, str]:
    if threshold is None and query.default_threshold is not None:
        return query.default_threshold, f"default for {query.score_name}"
    return choose_threshold(score, threshold, value_range=query.score_range, name=query.score_name)


def _query_summary(query: ResolvedQuery, threshold: float, mode: str) -> Dict[str, object]:
    return {"query": query.description, "threshold": threshold, "threshold_mode": mode,
            "query_file": "query_feature.safetensors"}


@dataclass
class ExportPointCloud(_PointOptions, _RunOptions):
    """A point cloud with features: surface points of the rendered training views (mvfm-features) or the
    Gaussians' centres (mvfm-splat), coloured by the run's PCA display basis; features in a companion .npy."""

    def main(self) -> Dict[str, object]:
        return self.export(self.load())

    def export(self, run: LoadedRun) -> Dict[str, object]:
        """Export from an already loaded run (``--load-config``, ``--data`` and ``--device`` unused)."""
        pts = _points(run, self)
        out = Path(self.output_dir)
        return _write_points(run, pts, self, out, "pointcloud", {})


@dataclass
class ExportSegment(QueryOptions, _PointOptions, _RunOptions):
    """The part of the scene like a query: for mvfm-splat the Gaussians as a standard 3DGS .ply, for mvfm-features
    the surface points, with cosine similarity to the query >= threshold."""

    def main(self) -> Dict[str, object]:
        return self.export(self.load())

    def export(self, run: LoadedRun) -> Dict[str, object]:
        """Export from an already loaded run (``--load-config``, ``--data`` and ``--device`` unused)."""
        query = resolve_query(run, self)
        pts = _points(run, self)
        sim = query.score(pts.features)
        threshold, mode = _threshold_for(query, sim, self.threshold)
        keep = sim >= threshold
        if not bool(keep.any()):
            what = "Gaussian" if run.is_splat else "surface point"
            raise ValueError(f"empty segmentation: no {what} has {query.score_name} >= {threshold:.3f} with the query "
                             f"({query.description}; highest {float(sim.max()):.3f}): lower --threshold")
        out = Path(self.output_dir)
        save_resolved_query(out / "query_feature.safetensors", run, query)
        info = {**_query_summary(query, threshold, mode), "candidates": len(pts)}
        seg = pts.select(keep)
        if not run.is_splat:
            return _write_points(run, seg, self, out, "segment", info)
        gaussians = seg.index["gaussian"]
        comments = [f"mvfm-export segment {run.config_path}", f"query: {query.description}",
                    f"threshold {threshold:.4f} ({mode})"]
        write_gaussian_ply(out / "segment.ply", run.model, gaussians, comments)
        write_features(out / "segment_features.npy", seg.features, self.feature_dtype)
        with open(out / "segment_gaussians.npy", "wb") as fh:
            np.save(fh, gaussians.numpy().astype(np.int64))
        summary = {"method": run.method, "run": str(run.config_path), "checkpoint": str(run.checkpoint),
                   "step": run.step, "gaussians": len(seg), "of_gaussians": int(run.model.num_points),
                   "ply": "segment.ply", "format": "3D Gaussian Splatting (x y z nx ny nz f_dc_* f_rest_* opacity "
                   "scale_* rot_*)", "features": "segment_features.npy", "feature_dtype": self.feature_dtype,
                   "gaussian_index": "segment_gaussians.npy", "min_opacity": self.min_opacity,
                   "frame": "Nerfstudio dataparser-normalised (model) frame", **info}
        atomic_write(out / "segment.json", json.dumps(summary, indent=1).encode())
        return summary


@dataclass
class ExportViews(QueryOptions, _RunOptions):
    """Per-view renders: features (.npy float16), PCA colours, RGB and, with a query, similarity and masks (PNG),
    for the training views or a Nerfstudio camera path. One threshold for all views (Otsu over all rendered
    pixels when --threshold is not given)."""

    camera_path: Optional[Path] = None
    """A Nerfstudio camera path json (the viewer's Render tab / ns-render's --camera-path-filename). None = the
    training views."""
    views: Optional[List[int]] = None
    """Training views to render (default: all; ignored with --camera-path)."""
    downscale: float = 1.0
    """Render at 1/downscale of the cameras' resolution."""

    def _cameras(self, run: LoadedRun):
        if self.camera_path is not None:
            from nerfstudio.cameras.camera_paths import get_path_from_json

            path = Path(self.camera_path)
            if not path.is_file():
                raise ValueError(f"camera path {path} does not exist")
            try:
                cameras = get_path_from_json(json.loads(path.read_text()))
            except (KeyError, ValueError, TypeError) as exc:
                raise ValueError(f"{path} is not a Nerfstudio camera path json (render_height, render_width, "
                                 f"camera_path[].camera_to_world/fov): {exc!r}") from exc
            return cameras, [f"frame_{i:05d}" for i in range(len(cameras))]
        cameras = run.train_cameras
        n = len(cameras)
        views = list(range(n)) if self.views is None else [int(v) for v in self.views]
        bad = [v for v in views if not 0 <= v < n]
        if bad:
            raise ValueError(f"--views {bad} out of range: the run has {n} training views (0..{n - 1})")
        names = [f"{i:05d}_{Path(run.train_image_names[i]).stem}" for i in views]
        return cameras[torch.tensor(views)], names

    def main(self) -> Dict[str, object]:
        return self.export(self.load())

    def export(self, run: LoadedRun) -> Dict[str, object]:
        """Export from an already loaded run (``--load-config``, ``--data`` and ``--device`` unused)."""
        if self.downscale <= 0:
            raise ValueError(f"--downscale must be > 0, got {self.downscale}")
        query = resolve_query(run, self) if self.has_query() else None  # without one: no similarity or masks
        cameras, names = self._cameras(run)
        out = Path(self.output_dir)
        lo, hi = run.model.config.similarity_range if query is None or query.text is None else query.score_range
        rows, sims = [], []
        for k, name in enumerate(names):
            cam = cameras[k : k + 1]
            cam.rescale_output_resolution(1.0 / self.downscale)
            o = render_view(run.model, cam)
            feature = o["feature"].float().cpu()
            write_features(out / "features" / f"{name}.npy", feature)  # [H, W, D] float16
            save_png(out / "pca" / f"{name}.png", _u8(o["feature_pca"]))
            save_png(out / "rgb" / f"{name}.png", _u8(o["rgb"]))
            row = {"name": name, "size": [int(feature.shape[0]), int(feature.shape[1])],
                   "features": f"features/{name}.npy", "pca": f"pca/{name}.png", "rgb": f"rgb/{name}.png"}
            if query is not None:
                sim = query.score(feature)
                save_png(out / "similarity" / f"{name}.png", heatmap(sim, lo, hi))
                # float32, as the masks are computed: float16 would round values (and numpy would round the
                # threshold) across the cut, so npy >= views.json's threshold would not reproduce the masks
                write_features(out / "similarity" / f"{name}.npy", sim, "float32")
                sims.append(sim)
            rows.append(row)
        summary: Dict[str, object] = {"method": run.method, "run": str(run.config_path), "step": run.step,
                                      "cameras": str(self.camera_path) if self.camera_path else "training views",
                                      "feature_dim": run.model.feature_dim, "views": rows}
        if query is not None:
            threshold, mode = _threshold_for(query, torch.cat([s.flatten() for s in sims]), self.threshold)
            for row, sim in zip(rows, sims):
                mask = sim >= threshold
                save_png(out / "masks" / f"{row['name']}.png", mask.numpy().astype(np.uint8) * 255)
                row.update({"similarity": f"similarity/{row['name']}.png", "mask": f"masks/{row['name']}.png",
                            "mask_fraction": float(mask.float().mean())})
            save_resolved_query(out / "query_feature.safetensors", run, query)
            summary.update({**_query_summary(query, threshold, mode), "score": query.score_name,
                            "similarity_range": [lo, hi]})
        atomic_write(out / "views.json", json.dumps(summary, indent=1).encode())
        return summary


def _u8(rgb: torch.Tensor) -> np.ndarray:
    return (rgb.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _commands():
    from typing import Union

    import tyro
    from typing_extensions import Annotated

    return Union[
        Annotated[ExportPointCloud, tyro.conf.subcommand(name="pointcloud")],
        Annotated[ExportSegment, tyro.conf.subcommand(name="segment")],
        Annotated[ExportViews, tyro.conf.subcommand(name="views")],
    ]


Commands = _commands()
"""The tyro subcommand union of ``mvfm-export``."""
