"""In-memory per-scene data for training and evaluation: views at one resolution, a train /
held-out split, pools of view sets with their correspondences, and cached base features.

Everything is computed once per scene (scenes here have tens of views; at ~224 px a scene's
images take a few tens of MB), so a training step only indexes tensors.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import SceneError
from ..geometry.feature_grid import input_size_for
from .correspondences import Correspondences, correspondences_from_depth, correspondences_from_tracks
from .readers import load_scene
from .sampling import sample_view_sets, split_views
from .scene import PosedScene

__all__ = [
    "SceneData", "SceneLike", "ViewSet", "prepare_scene", "build_view_sets", "heldout_view_sets",
    "usable_heldout_views",
]

SceneLike = Union[PosedScene, str, Path]


@dataclass
class ViewSet:
    """One set of S views with its ground-truth correspondences in training-resolution pixels.

    Correspondences are computed on first access of :attr:`corr` (by ``source``) and cached, so
    large pools cost nothing until a set is drawn.
    """

    views: Tuple[int, ...]
    """Scene view indices (positions 0..S-1 in ``corr`` refer to this order)."""
    source: Optional[Callable[[], Correspondences]] = field(default=None, repr=False)
    """Computes the correspondences (scaled to the :class:`SceneData` resolution)."""
    _corr: Optional[Correspondences] = field(default=None, repr=False)

    @property
    def corr(self) -> Correspondences:
        if self._corr is None:
            if self.source is None:
                raise ValueError(f"view set {self.views} has neither correspondences nor a source for them")
            self._corr = self.source()
        return self._corr


@dataclass
class SceneData:
    """One scene's views loaded at a fixed resolution, with its train / held-out split.

    Attributes:
        scene: the posed scene.
        size: ``(H, W)`` of the loaded images (multiples of the patch size).
        images: ``[N, 3, H, W]`` float32 in [0, 1], all N views of the scene.
        intrinsics: ``[N, 3, 3]`` float32 in pixels of ``size``.
        cam_to_world: ``[N, 4, 4]`` float32 OpenCV.
        train_views / heldout_views: scene view indices of the split.
        base: ``[N, C, h, w]`` frozen-base features of every view once :meth:`compute_base` ran.
    """

    scene: PosedScene
    size: Tuple[int, int]
    images: torch.Tensor
    intrinsics: torch.Tensor
    cam_to_world: torch.Tensor
    train_views: List[int]
    heldout_views: List[int]
    base: Optional[torch.Tensor] = None

    @property
    def name(self) -> str:
        return self.scene.name

    def inputs(self, views: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model inputs of one set: images ``[1, S, 3, H, W]``, intrinsics ``[1, S, 3, 3]``, poses ``[1, S, 4, 4]``."""
        idx = torch.as_tensor(list(views), dtype=torch.long)
        return self.images[idx][None], self.intrinsics[idx][None], self.cam_to_world[idx][None]

    @torch.no_grad()
    def compute_base(self, model, chunk: int = 8) -> torch.Tensor:
        """Cache the frozen base model's features of every view (``model.forward_base``), on the CPU.

        Images are moved to the model's device chunk by chunk (the scene's images stay on the CPU).
        """
        device = next(model.parameters()).device
        feats = [model.forward_base(self.images[i : i + chunk][None].to(device))[0].cpu()
                 for i in range(0, len(self.images), chunk)]
        self.base = torch.cat(feats)
        return self.base

    def correspondences(
        self, views: Sequence[int], max_per_pair: Optional[int] = None, seed: int = 0
    ) -> Correspondences:
        """Ground-truth correspondences of a view set in pixels of :attr:`size` (tracks, else depth)."""
        views = list(views)
        if self.scene.tracks is not None and len(self.scene.tracks):
            corr = correspondences_from_tracks(self.scene, views, max_per_pair=max_per_pair, seed=seed)
        elif self.scene.has_depth:
            corr = correspondences_from_depth(self.scene, views, max_per_pair=max_per_pair, seed=seed)
        else:
            raise ValueError(
                f"scene {self.name!r} has neither SfM tracks nor depth maps: no ground-truth correspondences "
                "(add a COLMAP model with points3D beside transforms.json, or depth_file_path entries)"
            )
        return corr.scaled(self.scene, views, self.size)


def prepare_scene(
    scene: SceneLike, long_side: int, patch_size: int, holdout_every: int = 8,
    heldout_views: Optional[Sequence[int]] = None, size: Optional[Tuple[int, int]] = None,
) -> SceneData:
    """Load every view of ``scene`` at ~``long_side`` px and split it into train / held-out views.

    Args:
        scene: a :class:`PosedScene` or a scene folder (:func:`mvfm_nerfstudio.data.load_scene`).
        long_side: target long image side in pixels (rounded to the patch size).
        patch_size: the backbone's patch size.
        holdout_every: every k-th view is held out (:func:`mvfm_nerfstudio.data.split_views`); 0 = none.
        heldout_views: explicit held-out view indices (overrides ``holdout_every``).
        size: explicit ``(H, W)`` every view is resized to, aspect ratio not kept (e.g. a profile's square
            input); overrides ``long_side``. Multiples of ``patch_size``.
    """
    if not isinstance(scene, PosedScene):
        scene = load_scene(scene)
    sizes = [tuple(int(v) for v in s) for s in scene.image_sizes.tolist()]
    common = max(set(sizes), key=sizes.count)
    if size is None:
        size = input_size_for(common, long_side, patch_size)
    elif size[0] % patch_size or size[1] % patch_size:
        raise ValueError(f"image size {tuple(size)} is not a multiple of the patch size {patch_size}")
    size = (int(size[0]), int(size[1]))
    if heldout_views is not None:
        held = sorted({int(i) for i in heldout_views})
        train = [i for i in range(len(scene)) if i not in held]
    elif holdout_every and holdout_every > 0:
        train, held = (list(map(int, x)) for x in split_views(scene, holdout_every=holdout_every))
    else:
        train, held = list(range(len(scene))), []
    if len(train) < 2:
        hint = (f"; with {len(scene)} views hold none out: --holdout-every 0 (holdout_every=0)"
                if held and len(scene) >= 2 else "")
        raise ValueError(f"scene {scene.name!r}: only {len(train)} training views after the split "
                         f"({len(held)} held out); need >= 2{hint}")
    batch = scene.load_views(range(len(scene)), size=size)
    return SceneData(
        scene=scene, size=size, images=batch.images, intrinsics=batch.intrinsics,
        cam_to_world=batch.cam_to_world, train_views=train, heldout_views=held,
    )


def build_view_sets(
    data: SceneData,
    num_views: int,
    num_sets: int,
    min_shared: int,
    seed: int,
    candidates: Optional[Sequence[int]] = None,
    must_include: Optional[Sequence[int]] = None,
    max_per_pair: Optional[int] = None,
) -> List[ViewSet]:
    """Sample view sets (:func:`mvfm_nerfstudio.data.sample_view_sets`) with (lazily computed) correspondences."""
    sets = sample_view_sets(
        data.scene, num_views=num_views, min_shared=min_shared, num_sets=num_sets, seed=seed,
        candidates=None if candidates is None else list(candidates),
        must_include=None if must_include is None else list(must_include),
    )
    return [
        ViewSet(tuple(int(v) for v in s), partial(data.correspondences, tuple(s), max_per_pair, seed + k))
        for k, s in enumerate(sets)
    ]


def usable_heldout_views(data: SceneData, num_views: int, min_shared: int) -> Tuple[List[int], List[int]]:
    """Split the held-out views into those that can join a valid set and those that cannot.

    A held-out view is unusable when it shares fewer than ``min_shared`` correspondences with every
    other view (e.g. an isolated frame of a video): no set can contain it.

    Returns:
        ``(usable, skipped)`` scene view indices.
    """
    usable, skipped = [], []
    for h in data.heldout_views:
        try:
            sample_view_sets(data.scene, num_views=num_views, min_shared=min_shared, num_sets=1, seed=0,
                             must_include=[h])
            usable.append(h)
        except SceneError:
            skipped.append(h)
    return usable, skipped


def heldout_view_sets(
    data: SceneData, num_views: int, num_sets: int, min_shared: int, seed: int, max_per_pair: Optional[int] = None
) -> List[ViewSet]:
    """Evaluation sets: each contains at least one held-out view (placed first); the others may be any view.

    Sets are spread evenly (round-robin) over the held-out views that can be in a set at all
    (:func:`usable_heldout_views`; the others are skipped with a warning).

    Raises:
        ValueError: the scene has no (usable) held-out views.
    """
    if not data.heldout_views:
        raise ValueError(f"scene {data.name!r} has no held-out views; set holdout_every > 0")
    usable, skipped = usable_heldout_views(data, num_views, min_shared)
    if skipped:
        warnings.warn(
            f"scene {data.name!r}: held-out views {skipped} share < {min_shared} correspondences with every "
            f"other view and cannot be evaluated in {num_views}-view sets; skipped",
            stacklevel=2,
        )
    if not usable:
        raise ValueError(
            f"scene {data.name!r}: none of the held-out views {data.heldout_views} can form a {num_views}-view set "
            f"with >= {min_shared} shared correspondences; lower min_shared or num_views"
        )
    per_view = math.ceil(num_sets / len(usable))
    groups = [
        build_view_sets(data, num_views, per_view, min_shared, seed + 101 * k, must_include=[h],
                        max_per_pair=max_per_pair)
        for k, h in enumerate(usable)
    ]
    interleaved = [g[i] for i in range(per_view) for g in groups if i < len(g)]
    return interleaved[:num_sets]
