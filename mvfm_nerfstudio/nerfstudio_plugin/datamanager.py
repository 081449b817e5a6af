"""Datamanagers that supervise with cached MVFM features.

* :class:`MVFMDataManager` (ray-based, for NeRF): a :class:`VanillaDataManager` (single
  process: the parallel datamanager spawns workers) whose training batches carry
  ``batch["feature"]`` ``[num_rays, D]``, sampled bilinearly from each image's feature map
  at the rays' pixel centres.
* :class:`MVFMFullImageDatamanager` (for splatting): a :class:`FullImageDatamanager` whose
  training data carry ``data["feature"]`` ``[h, w, D]`` float32, the whole image's feature
  map. It spans the full ``H x W`` image (``data["image"]``): cell ``(i, j)`` is centred at
  pixel ``((j + 0.5) W / w, (i + 0.5) H / h)``; upsample with
  :func:`~mvfm_nerfstudio.geometry.feature_grid.resize_map` (bilinear,
  ``align_corners=False``) or render at ``h x w`` by scaling the camera with
  ``camera.rescale_output_resolution(...)``. ``data["feature_grid"]`` holds ``(h, w)``.

Both build a :class:`~mvfm_nerfstudio.feature_store.FeatureStore` from
the training dataset (cameras converted from Nerfstudio's OpenGL convention to OpenCV,
intrinsics in pixels of the images as loaded, i.e. after the dataparser's downscaling and
``camera_res_scale_factor``; the dataparser's recentring/rescaling of poses does not
matter, the MVFM is invariant to similarity transforms) and put into the training
dataset's metadata, which the pipeline hands to the model:

* ``metadata["mvfm_feature_dim"]``: D;
* ``metadata["mvfm_display_basis"]``: the 3-component display PCA (a state dict of
  :class:`~mvfm_nerfstudio.features.PCABasis`) for fixed-colour ``feature_pca`` renders;
* ``metadata["mvfm_text_space"]`` (text-space features only): the backbone spec and PCA reduction the viewer's
  text box needs (``feature_head.TEXT_SPACE_KEY``).

Evaluation batches carry no features (the feature loss is a training signal only).

Before Nerfstudio reads anything, both validate the scene with the package's own readers
(:func:`validate_scene`: poses, intrinsics, every image decoded once, one image size for the ray-based one), so a
bad input is a :class:`~mvfm_nerfstudio.errors.SceneError` naming the frame and file, not an error deep inside
Nerfstudio's loaders or collate, and never after a "cache miss -> computing".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Tuple, Type

import torch
from nerfstudio.cameras.cameras import CameraType
from nerfstudio.configs.dataparser_configs import AnnotatedDataParserUnion
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.utils.rich_utils import CONSOLE

from ..data.readers import load_scene
from ..errors import SceneError
from ..feature_store import FeatureStore, FeatureStoreConfig, ViewSource, describe
from ..geometry.cameras import opengl_to_opencv, to_homogeneous
from .feature_head import DISPLAY_BASIS_KEY, FEATURE_DIM_KEY, TEXT_SPACE_KEY

__all__ = [
    "MVFMDataManagerConfig",
    "MVFMDataManager",
    "MVFMFullImageDatamanagerConfig",
    "MVFMFullImageDatamanager",
    "view_source_from_dataset",
    "scene_path",
    "validate_scene",
    "training_view_source",
]


def scene_path(config) -> Path:
    """The scene a datamanager ``config`` reads: ``--data`` (``config.data``) when given, else its dataparser's
    ``data`` (Nerfstudio's datamanagers copy the first into the second only when they are set up)."""
    return Path(config.data) if config.data is not None else Path(config.dataparser.data)


def validate_scene(config, one_image_size: bool) -> None:
    """Check the scene the datamanager ``config`` will read (:func:`scene_path`) with the package's validators
    (they name frame and file).

    For the Nerfstudio (transforms.json) and COLMAP dataparsers: every pose and intrinsic finite and valid, every image
    present and decodable with its stated size, and (``one_image_size``, the ray-based datamanager, whose batches
    stack pixels of all images) one size for all images. Other dataparsers are left to Nerfstudio.

    Raises:
        SceneError: naming the first bad frame or file.
    """
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    if not isinstance(config.dataparser, (NerfstudioDataParserConfig, ColmapDataParserConfig)):
        return
    data = scene_path(config)
    if not data.exists():
        raise SceneError(f"--data {data} does not exist")
    scene = load_scene(data, tracks=False, check_files=False)
    scene.check_files(check_depth=False, decode_images=True)
    sizes = [tuple(int(v) for v in s) for s in scene.image_sizes.tolist()]
    if one_image_size and len(set(sizes)) > 1:
        odd = next(i for i, s in enumerate(sizes) if s != sizes[0])
        raise SceneError(
            f"scene {data}: images differ in size: frame {odd} ({scene.image_paths[odd]}) is "
            f"{sizes[odd][1]}x{sizes[odd][0]}, frame 0 ({scene.image_paths[0]}) is {sizes[0][1]}x{sizes[0][0]} (WxH); "
            "mvfm-features needs one image size: resize the images to one size (or train with mvfm-splat)"
        )


def view_source_from_dataset(dataset, load_image, data_root: Path, extra_key: Dict[str, object]) -> ViewSource:
    """A :class:`ViewSource` for a Nerfstudio ``InputDataset`` (its cameras as they are now).

    Args:
        dataset: the training ``InputDataset``.
        load_image: ``i -> [H, W, 3|4]`` image exactly as the consumer trains on it.
        data_root: the scene's data path (names the cache entry).
        extra_key: how the pixels were produced (scale factor, undistortion), part of the cache key.
    """
    cams = dataset.cameras
    if cams.shape != (len(dataset),):
        raise ValueError(f"expected one camera per image, got cameras of shape {tuple(cams.shape)}")
    bad = (cams.camera_type.view(-1) != CameraType.PERSPECTIVE.value).nonzero().view(-1)
    if len(bad):
        raise ValueError(
            f"MVFM features need perspective (pinhole) cameras; image {dataset.image_filenames[int(bad[0])]} has "
            f"camera type {CameraType(int(cams.camera_type.view(-1)[bad[0]])).name}"
        )
    extra = dict(extra_key)
    if cams.distortion_params is not None and bool((cams.distortion_params != 0).any()):
        # Rays are undistorted by Nerfstudio; the MVFM sees the images as they are (pinhole rays).
        extra["distortion"] = cams.distortion_params.double().round(decimals=6).tolist()
    sizes = torch.cat([cams.height, cams.width], dim=-1).long()
    data_root = Path(data_root)
    name = data_root.stem if data_root.suffix == ".json" else data_root.name
    return ViewSource(
        image_paths=[Path(p) for p in dataset.image_filenames],
        image_sizes=sizes,
        intrinsics=cams.get_intrinsics_matrices().double(),
        cam_to_world=opengl_to_opencv(to_homogeneous(cams.camera_to_worlds.double())),
        load_image=load_image,
        extra_key=extra,
        scene_name=name,
        scene_root=data_root if data_root.is_dir() else data_root.parent,
    )


def training_view_source(config: "MVFMDataManagerConfig") -> ViewSource:
    """The training views :class:`MVFMDataManager` with ``config`` hands its feature store, built without the
    datamanager (no image caching, no ray sampler): the same dataparser split and dataset, so a store made from
    them uses the same cache entry as ``ns-train mvfm-features`` with these options (``mvfm-extract``)."""
    from nerfstudio.data.datasets.base_dataset import InputDataset

    dataparser_config = config.dataparser
    dataparser_config.data = scene_path(config)
    outputs = dataparser_config.setup().get_dataparser_outputs(split="train")
    ds = InputDataset(outputs, scale_factor=config.camera_res_scale_factor)
    return view_source_from_dataset(ds, ds.get_image_float32, dataparser_config.data, {"scale_factor": ds.scale_factor})


def _publish(store: FeatureStore, metadata: Dict, device) -> None:
    """Put the feature dimension and display basis into the dataset metadata; on a GPU keep the features there."""
    if torch.device(device).type == "cuda" and store.keep_on(torch.device(device)):
        CONSOLE.print(f"MVFM features: kept on {device} ({store.features.nbytes / 2**20:.0f} MB, float16)")
    metadata[FEATURE_DIM_KEY] = store.feature_dim
    assert store.display_basis is not None
    metadata[DISPLAY_BASIS_KEY] = {k: v.clone() for k, v in store.display_basis.state().items()}
    if store.config.text_space:
        c, reduction = store.config, store.reduction_basis
        metadata[TEXT_SPACE_KEY] = {
            "spec": {"backbone": c.backbone, "weights": str(c.weights), "tiny": c.tiny, "model_seed": c.model_seed},
            "reduction": None if reduction is None else {k: v.clone() for k, v in reduction.state().items()},
        }
    CONSOLE.print(f"MVFM features: {describe(store)}")


# ---------------------------------------------------------------------------------------------- ray-based


@dataclass
class MVFMDataManagerConfig(VanillaDataManagerConfig):
    """Ray-based datamanager adding MVFM feature targets (``batch["feature"]``) to every training batch."""

    _target: Type = field(default_factory=lambda: MVFMDataManager)
    dataparser: AnnotatedDataParserUnion = field(default_factory=NerfstudioDataParserConfig)
    """Scene format (Nerfstudio transforms.json by default)."""
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    """MVFM feature extraction: backbone, weights, adapters, view grouping, resolution, dimension, cache."""


class MVFMDataManager(VanillaDataManager):
    """:class:`VanillaDataManager` + MVFM features: ``batch["feature"]`` ``[num_rays, D]`` float32.

    The feature store is prepared (cache loaded, or features computed) in the constructor,
    before the pipeline builds the model, so the model can read the feature dimension from
    the training dataset's metadata.
    """

    config: MVFMDataManagerConfig

    def __init__(self, config: MVFMDataManagerConfig, device="cpu", test_mode="val", world_size=1, local_rank=0, **kw):
        validate_scene(config, one_image_size=True)
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank, **kw)
        ds = self.train_dataset
        source = view_source_from_dataset(
            ds, ds.get_image_float32, self.config.dataparser.data, {"scale_factor": ds.scale_factor}
        )
        self.feature_store = FeatureStore(self.config.features, source, device=str(device)).prepare()
        _publish(self.feature_store, ds.metadata, device)

    def next_train(self, step: int):
        ray_bundle, batch = super().next_train(step)
        batch["feature"] = self.feature_store.sample_pixels(batch["indices"]).to(self.device, non_blocking=True)
        return ray_bundle, batch


# ---------------------------------------------------------------------------------------------- full images


@dataclass
class MVFMFullImageDatamanagerConfig(FullImageDatamanagerConfig):
    """Full-image datamanager adding each training image's MVFM feature map (``data["feature"]``)."""

    _target: Type = field(default_factory=lambda: MVFMFullImageDatamanager)
    features: FeatureStoreConfig = field(default_factory=FeatureStoreConfig)
    """MVFM feature extraction: backbone, weights, adapters, view grouping, resolution, dimension, cache."""


class MVFMFullImageDatamanager(FullImageDatamanager):
    """:class:`FullImageDatamanager` + MVFM features.

    ``next_train`` data gain ``"feature"`` ``[h, w, D]`` float32 (on the training device)
    and ``"feature_grid"`` ``(h, w)``; see the module docstring for the pixel mapping.
    Features are computed from the cached (undistorted) training images and their
    (undistorted) cameras, i.e. exactly what the splats are fitted to.
    """

    config: MVFMFullImageDatamanagerConfig

    def __init__(self, config: MVFMFullImageDatamanagerConfig, device="cpu", test_mode="val", world_size=1,
                 local_rank=0, **kw):
        if config.cache_images == "cpu" and not torch.cuda.is_available():
            # Nerfstudio pins 'cpu'-cached images, which needs CUDA; without it the training device is the CPU.
            CONSOLE.print("No CUDA: caching images on the training device (cache_images='gpu') instead of pinned memory")
            config = dataclasses.replace(config, cache_images="gpu")  # a copy: the caller's config stays as given
        validate_scene(config, one_image_size=False)
        super().__init__(config, device=device, test_mode=test_mode, world_size=world_size, local_rank=local_rank, **kw)
        ds = self.train_dataset
        distorted = ds.cameras.distortion_params is not None and bool((ds.cameras.distortion_params != 0).any())
        cached = self.cached_train  # loads + undistorts, updating ds.cameras' intrinsics

        def load(i: int) -> torch.Tensor:
            return cached[i]["image"].cpu()

        # Without distortion these are the same pixels and cameras as the ray-based datamanager's: same cache entry.
        extra = {"scale_factor": ds.scale_factor, **({"undistorted": True} if distorted else {})}
        source = view_source_from_dataset(ds, load, self.config.dataparser.data, extra)
        self.feature_store = FeatureStore(self.config.features, source, device=str(device)).prepare()
        _publish(self.feature_store, ds.metadata, device)

    @property
    def feature_grid(self) -> Tuple[int, int]:
        return self.feature_store.grid

    def next_train(self, step: int):
        camera, data = super().next_train(step)
        idx = int(camera.metadata["cam_idx"])
        data["feature"] = self.feature_store.feature_map(idx).to(self.device)
        data["feature_grid"] = self.feature_store.grid
        return camera, data
