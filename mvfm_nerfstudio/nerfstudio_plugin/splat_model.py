"""``mvfm-splat``: splatfacto + a per-Gaussian latent feature distilled from cached MVFM features.

Design:

* Every Gaussian carries a ``latent_dim``-dim latent (``gauss_params["latents"]``, its own
  optimiser group). Because it lives in ``gauss_params``, gsplat's densification strategy
  (clone / split / prune / reset; it iterates over that dict and the optimisers of the same
  names) carries it along like any other Gaussian attribute, and splatfacto's
  ``load_state_dict`` resizes it with the others.
* **One pass**: RGB (from the spherical harmonics, evaluated per Gaussian), the latents and,
  when needed, depth are concatenated as channels and composited together by
  :func:`~mvfm_nerfstudio.splatting.rasterize` (gsplat's CUDA rasteriser
  with a GPU, our PyTorch tile compositor on CPU).
* **Decoder per pixel, after rasterising**: a small MLP maps the composited latent (divided
  by the accumulation, so partially transparent pixels still match their target; the same
  normalisation as the ``mvfm-features`` NeRF) to the cached feature dimension ``D``. The
  compositing cost grows with the channel count, so compositing ``latent_dim`` (16) instead
  of ``D`` (64-384) channels is several times cheaper, and decoding costs ``H x W`` MLP
  evaluations instead of one per Gaussian (usually many more Gaussians than pixels at
  CPU render sizes). The price: the rendered feature is a non-linear function of the
  composited latents instead of a composite of per-Gaussian features (identical for a
  linear decoder, ``decoder_hidden_dim=0``).
* Feature loss (``feature_loss``: mse / cosine / both, as ``mvfm-features``) against the
  datamanager's ``data["feature"]`` ``[h, w, D]``; ``feature_loss_resolution="render"``
  upsamples the cached map to the render, ``"grid"`` instead resamples the rendered map to the
  feature grid (both :func:`~mvfm_nerfstudio.geometry.feature_grid.resize_map`: cell ``(i, j)``
  centred at pixel ``((j + 0.5) W / w, (i + 0.5) H / h)``, antialiased when shrinking). The
  feature loss also moves the geometry (one pass).
* CPU: no ``.cuda()`` anywhere (splatfacto's seeded initialisation and ``get_outputs`` have
  one); cameras go from Nerfstudio's OpenGL camera-to-world to the rasteriser's OpenCV
  world-to-camera with :func:`mvfm_nerfstudio.geometry.opengl_to_opencv` and
  :func:`~mvfm_nerfstudio.geometry.cameras.invert_pose`; the feature head (loss, display, panels,
  lazy LPIPS) is shared with ``mvfm-features`` (:mod:`.feature_head`).
* Outputs: ``rgb``, ``depth``, ``accumulation``, ``background``, ``feature`` ``[H, W, D]``,
  ``feature_pca`` (fixed basis from the feature cache, saved in the checkpoint) and, with a
  query set, ``similarity``/``segmentation`` (``[H, W, 1]``; ``get_outputs_for_camera`` shows
  them as colour images, :mod:`.viewer_panels`). :meth:`MVFMSplatModel.feature_at_ray` renders
  one ray's feature and depth (click-to-query).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig, num_sh_bases, random_quat_tensor
from torch import Tensor, nn
from torch.nn import Parameter

from ..geometry.cameras import invert_pose, look_along, opengl_to_opencv
from ..geometry.feature_grid import resize_map
from ..splatting import rasterize, resolve_backend, sh_colors
from .feature_head import FeatureHeadConfig, FeatureHeadMixin, check_ray

__all__ = ["MVFMSplatModelConfig", "MVFMSplatModel"]


@dataclass
class MVFMSplatModelConfig(FeatureHeadConfig, SplatfactoModelConfig):
    """splatfacto + per-Gaussian latent features decoded to MVFM features (see the module docstring)."""

    _target: Type = field(default_factory=lambda: MVFMSplatModel)
    latent_dim: int = 13
    """Per-Gaussian latent feature channels (composited together with RGB). 13 makes RGB + latents 16 channels and
    17 with depth, both counts gsplat's CUDA rasteriser supports natively (others are zero-padded every render,
    e.g. 19-20 to 32)."""
    decoder_hidden_dim: int = 64
    """Hidden width of the per-pixel latent -> MVFM feature MLP; 0 = a linear decoder."""
    latent_init_std: float = 0.1
    """Standard deviation of the random initial latents."""
    feature_loss_resolution: Literal["auto", "render", "grid"] = "auto"
    """Where the feature loss is computed: 'render' (cached map upsampled to the render), 'grid' (render resampled
    to the cached feature grid), or 'auto': 'render' up to 512x512 rendered pixels (CPU-sized), 'grid' above
    (at 1-2 MP an upsampled H x W x D target costs several hundred MB per step)."""
    rasterizer: Literal["auto", "gsplat", "torch"] = "auto"
    """Rasteriser backend: 'auto' (gsplat's CUDA kernels on a GPU when they build, else, with a warning, the
    PyTorch tile compositor; on CPU the PyTorch compositor), 'gsplat' (fails naming the fix when its kernels are
    missing) or 'torch'. The first CUDA run compiles gsplat's kernels (minutes; needs nvcc)."""
    max_gaussians_per_pixel: Optional[int] = 256
    """PyTorch rasteriser: composite each pixel's first K contributing Gaussians (None = all, exact). Costs follow
    the actual list lengths, so the cap mainly bounds memory (long lists on large viewer renders)."""
    max_gaussians_per_block: Optional[int] = None
    """PyTorch rasteriser: consider only the front K Gaussians of each 8x8 block (None = all, exact; a cap bounds
    the cost of crowded blocks)."""
    ray_query_focal: float = 1000.0
    """Focal length (pixels) of the small pinhole camera feature_at_ray renders: larger = a thinner ray."""
    max_num_gaussians: Optional[int] = 3_000_000
    """Stop growing (clone/split) once there are this many Gaussians; pruning continues. None = no cap. The feature
    loss adds to the screen-space gradients splatfacto's densification threshold was tuned on (more Gaussians
    cross it), so GPU runs are capped too (splatfacto's scenes typically end at 0.5-3 M)."""
    max_num_gaussians_cpu: Optional[int] = 200_000
    """The same cap when training on CPU, where time per iteration grows with the count. None = no cap."""


class MVFMSplatModel(FeatureHeadMixin, SplatfactoModel):
    """Gaussian splatting with per-Gaussian latent features decoded to MVFM features (see the module docstring)."""

    config: MVFMSplatModelConfig
    datamanager_hint = ("the full-image MVFM datamanager "
                        "(mvfm_nerfstudio.nerfstudio_plugin.datamanager.MVFMFullImageDatamanagerConfig)")

    def populate_modules(self):
        c = self.config
        if c.use_bilateral_grid:
            raise ValueError("mvfm-splat does not support use_bilateral_grid (set --pipeline.model.use-bilateral-grid "
                             "False)")
        # probed once: gsplat may compile its CUDA kernels here (first run) or be unusable (no nvcc)
        self.rasterizer_backend = resolve_backend(c.rasterizer, torch.device(self.kwargs.get("device", "cpu")))
        seed = self.seed_points
        # splatfacto's seeded initialisation calls .cuda(): let it initialise randomly, then re-seed on any device
        self.seed_points = None
        super().populate_modules()  # splatfacto, then the feature head (display, panels)
        self.seed_points = seed
        if seed is not None and not c.random_init and len(seed[0]) >= 4:
            self._init_gaussians(seed[0].float(), seed[1].float() / 255.0 if len(seed[1]) else None)
        n = self.num_points
        self.gauss_params["latents"] = Parameter(torch.randn(n, c.latent_dim) * c.latent_init_std)  # device: CPU init

        dim = self.feature_dim
        if c.decoder_hidden_dim > 0:
            self.feature_decoder = nn.Sequential(
                nn.Linear(c.latent_dim, c.decoder_hidden_dim), nn.ReLU(), nn.Linear(c.decoder_hidden_dim, dim)
            )
        else:
            self.feature_decoder = nn.Linear(c.latent_dim, dim)

    def _init_gaussians(self, means: Tensor, rgb: Optional[Tensor]) -> None:
        """(Re)initialise the Gaussians at ``means [N, 3]`` with colours ``rgb [N, 3]`` in [0, 1] (as splatfacto)."""
        distances, _ = self.k_nearest_sklearn(means, 3)
        scales = torch.log(torch.from_numpy(distances).mean(dim=-1, keepdim=True).clamp_min(1e-7).repeat(1, 3))
        n, dim_sh = means.shape[0], num_sh_bases(self.config.sh_degree)
        shs = torch.zeros(n, dim_sh, 3)  # device: CPU init
        if rgb is not None:
            shs[:, 0] = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
        else:
            shs[:, 0] = torch.rand(n, 3)  # device: CPU init
        params = {"means": means, "scales": scales, "quats": random_quat_tensor(n), "features_dc": shs[:, 0],
                  "features_rest": shs[:, 1:], "opacities": torch.logit(0.1 * torch.ones(n, 1))}  # device: CPU init
        for name, value in params.items():
            self.gauss_params[name] = Parameter(value.contiguous())

    # ------------------------------------------------------------------------------------------ parameters

    @property
    def latents(self) -> Tensor:
        return self.gauss_params["latents"]

    def get_gaussian_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_gaussian_param_groups()
        groups["latents"] = [self.gauss_params["latents"]]
        return groups

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        groups = super().get_param_groups()
        groups["feature_decoder"] = list(self.feature_decoder.parameters())
        return groups

    def _gaussian_cap(self) -> Optional[int]:
        caps = [self.config.max_num_gaussians]
        if self.device.type == "cpu":
            caps.append(self.config.max_num_gaussians_cpu)
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def step_post_backward(self, step):
        """splatfacto's densification step, without growth once the Gaussian cap is reached."""
        cap = self._gaussian_cap()
        if cap is None or self.num_points < cap:
            return super().step_post_backward(step)
        grow = self.strategy.grow_grad2d, self.strategy.grow_scale2d
        # nothing clones or splits (by gradient or by screen size); pruning and opacity resets go on
        self.strategy.grow_grad2d = self.strategy.grow_scale2d = float("inf")
        try:
            return super().step_post_backward(step)
        finally:
            self.strategy.grow_grad2d, self.strategy.grow_scale2d = grow

    # ------------------------------------------------------------------------------------------ rendering

    def _backend(self) -> str:
        """The rasteriser chosen at set-up, re-chosen if the model has since moved to another kind of device."""
        if (self.rasterizer_backend == "gsplat") != (self.device.type == "cuda"):
            self.rasterizer_backend = resolve_backend(self.config.rasterizer, self.device)
        return self.rasterizer_backend

    def _sh_degree(self) -> Optional[int]:
        if self.config.sh_degree <= 0:
            return None
        return min(self.step // self.config.sh_degree_interval, self.config.sh_degree)

    def _render(self, viewmat: Tensor, K: Tensor, width: int, height: int, render_depth: bool,
                crop_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor], Dict]:
        """Composite RGB, latents (and depth) in one pass.

        Returns:
            ``rgb [H, W, 3]`` (no background), ``feature [H, W, D]``, ``alpha [H, W, 1]``,
            ``depth [H, W, 1]`` or None, and the rasteriser's meta (densification info).
        """
        p = {k: (v if crop_ids is None else v[crop_ids]) for k, v in self.gauss_params.items()}
        degree = self._sh_degree()
        if degree is None:
            colors = torch.sigmoid(p["features_dc"])
        else:
            sh = torch.cat([p["features_dc"][:, None], p["features_rest"]], dim=1)
            colors = sh_colors(sh, p["means"], viewmat, degree, self._backend())
        channels = torch.cat([colors, p["latents"]], dim=-1)
        render, alpha, meta = rasterize(
            p["means"], p["quats"], torch.exp(p["scales"]), torch.sigmoid(p["opacities"]).squeeze(-1), channels,
            viewmat, K, width, height, near_plane=0.01, far_plane=1e10, antialiased=self.config.rasterize_mode ==
            "antialiased", render_depth=render_depth, max_per_block=self.config.max_gaussians_per_block,
            max_per_pixel=self.config.max_gaussians_per_pixel,
            absgrad=self.strategy.absgrad and self.training, backend=self._backend(),
        )
        latent_end = 3 + self.config.latent_dim
        latent = render[..., 3:latent_end] / alpha.clamp_min(1e-3)
        feature = self.feature_decoder(latent)
        depth = render[..., latent_end:] if render_depth else None
        return render[..., :3], feature, alpha, depth, meta

    def _camera_matrices(self, camera: Cameras) -> Tuple[Tensor, Tensor, int, int]:
        """OpenCV world-to-camera ``[4, 4]``, intrinsics ``[3, 3]`` and size at the current downscale factor."""
        if self.training:
            if camera.shape[0] != 1:
                raise ValueError(f"mvfm-splat trains on one camera at a time, got {camera.shape[0]}")
            c2w = self.camera_optimizer.apply_to_camera(camera)[0]
        else:
            c2w = camera.camera_to_worlds.reshape(-1, 3, 4)[0]
        d = self._get_downscale_factor()
        K = camera.get_intrinsics_matrices().reshape(-1, 3, 3)[0].to(self.device).float()
        K = torch.cat([K[:2] / d, K[2:]], dim=0)
        width, height = int(camera.width.reshape(-1)[0]) // d, int(camera.height.reshape(-1)[0]) // d
        return invert_pose(opengl_to_opencv(c2w.to(self.device).float())), K, width, height

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """Render one camera: ``rgb``, ``depth``, ``accumulation``, ``background``, ``feature``, ``feature_pca``, ..."""
        if not isinstance(camera, Cameras):
            raise TypeError(f"mvfm-splat renders Cameras, got {type(camera).__name__}")
        crop_ids = None
        if self.crop_box is not None and not self.training:
            crop_ids = self.crop_box.within(self.means).squeeze()
            if crop_ids.sum() == 0:
                empty = self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()),
                                               self.background_color.to(self.device))
                empty["feature"] = self.feature_decoder(empty["rgb"].new_zeros(*empty["rgb"].shape[:2],
                                                                               self.config.latent_dim))
                empty.update(self.feature_display(empty["feature"]))
                return empty
        viewmat, K, width, height = self._camera_matrices(camera)
        self.last_size = (height, width)
        render_depth = self.config.output_depth_during_training or not self.training
        rgb, feature, alpha, depth, self.info = self._render(viewmat, K, width, height, render_depth, crop_ids)
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step,
                                            self.info)
        background = self._get_background_color()
        rgb = torch.clamp(rgb + (1 - alpha) * background, 0.0, 1.0)
        if depth is not None:
            depth = torch.where(alpha > 0, depth, depth.detach().max())
        if not self.training:
            background = background.expand(height, width, 3)
        outputs = {"rgb": rgb, "depth": depth, "accumulation": alpha, "background": background, "feature": feature}
        outputs.update(self.feature_display(feature))
        return outputs  # type: ignore[return-value]

    @torch.no_grad()
    def feature_at_ray(self, origin: Tensor, direction: Tensor, camera_index: int = 0,
                       focal: Optional[float] = None, with_depth: bool = False):
        """Render the feature along one ray.

        A ``15 x 15`` pinhole camera at ``origin`` looks along ``direction``; the centre pixel's
        centre is the principal point, so its feature is the ray's. (A 1x1 image would do for
        the pixel, but gsplat's projection clamps Jacobians to a margin around the image, which
        distorts large Gaussians just outside a tiny field of view.)

        Args:
            origin: ``[3]`` ray origin in the model's world frame (Nerfstudio's dataparser-normalised
                coordinates, the frame of ``Cameras.camera_to_worlds``).
            direction: ``[3]`` ray direction (any length > 0).
            camera_index: unused (kept for the same signature as the ``mvfm-features`` model).
            focal: focal length in pixels (default ``config.ray_query_focal``); pass the viewer's
                focal length to get exactly the feature the viewer renders at the clicked pixel.
            with_depth: also return the surface distance.

        Returns:
            ``[D]`` feature (float32, on the model's device); with ``with_depth``, ``(feature, depth)``
            where ``depth`` ``[]`` is the expected depth of the centre pixel (= distance along the unit
            direction, world units), NaN when its opacity is below 0.5 (the ray hits nothing).
        """
        origin, direction = check_ray(origin, direction, self.device)
        f = float(self.config.ray_query_focal if focal is None else focal)
        size = 15
        K = torch.tensor([[f, 0.0, size / 2], [0.0, f, size / 2], [0.0, 0.0, 1.0]], device=self.device)
        was_training = self.training
        self.eval()
        try:
            viewmat = invert_pose(look_along(origin, direction))
            _, feature, alpha, depth, _ = self._render(viewmat, K, size, size, render_depth=with_depth)
        finally:
            self.train(was_training)
        c = size // 2
        if not with_depth:
            return feature[c, c]
        return feature[c, c], torch.where(alpha[c, c, 0] >= 0.5, depth[c, c, 0], torch.nan)

    # ------------------------------------------------------------------------------------------ losses

    def feature_pair(self, outputs: Dict, batch: Dict) -> Tuple[Tensor, Tensor]:
        """Rendered and target feature maps at the loss resolution (both ``[h', w', D]``)."""
        pred = outputs["feature"]
        target = batch["feature"].to(pred)
        if target.ndim != 3 or target.shape[-1] != pred.shape[-1]:
            raise ValueError(f"batch['feature'] must be [h, w, {pred.shape[-1]}], got {list(target.shape)}")
        mode = self.config.feature_loss_resolution
        if mode == "auto":
            mode = "render" if pred.shape[0] * pred.shape[1] <= 512 * 512 else "grid"
        if mode == "grid":
            return resize_map(pred, tuple(target.shape[:2])), target
        return pred, resize_map(target, tuple(pred.shape[:2]))
