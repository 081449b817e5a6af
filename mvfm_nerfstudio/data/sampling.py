"""Which views go together: view-set sampling (sets that see common structure), grouping of all views of a
scene into multi-view sets by pose (feature extraction), and train / held-out view splits."""

from __future__ import annotations

import math
from typing import List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import SceneError
from ..geometry.cameras import select_neighbor_views
from ..utils.runtime import single_threaded
from .correspondences import correspondences_from_depth
from .scene import PosedScene, _as_index_list

__all__ = ["DEPTH_SAMPLES_PER_VIEW", "GROUPINGS", "shared_counts", "sample_view_sets", "split_views", "group_views"]

Source = Literal["auto", "tracks", "depth"]


DEPTH_SAMPLES_PER_VIEW = 2048


def shared_counts(
    scene: PosedScene, source: Source = "auto", depth_stride: Optional[int] = None, rel_depth_tol: float = 0.02
) -> torch.Tensor:
    """``[N, N]`` long symmetric matrix: how many correspondences each pair of views shares.

    ``tracks``: number of 3D points observed in both views. ``depth``: number of depth
    correspondences (see :func:`correspondences_from_depth`) at ``depth_stride`` (default: about
    :data:`DEPTH_SAMPLES_PER_VIEW` source pixels per view, whatever the image size), the smaller
    of the two directions. ``auto`` uses tracks when present, else depth. Cached on the scene.
    The diagonal is 0.
    """
    if source == "auto":
        source = "tracks" if scene.tracks is not None else "depth"
    if depth_stride is None:
        pixels = float(scene.image_sizes.prod(-1).double().median())
        depth_stride = max(1, int(round(math.sqrt(pixels / DEPTH_SAMPLES_PER_VIEW))))
    key = f"shared_counts/{source}/{depth_stride}/{rel_depth_tol}"
    cached = scene._cache.get(key)
    if cached is not None:
        return cached.clone()
    n = len(scene)
    if source == "tracks":
        if scene.tracks is None:
            raise SceneError(f"scene {scene.name!r} has no tracks")
        counts = scene.tracks.covisibility(n)
    elif source == "depth":
        if scene.depth_paths is None:
            raise SceneError(
                f"scene {scene.name!r} has neither tracks nor depth maps, so shared correspondences cannot be "
                "counted; pass min_shared=0 to sample view sets without that constraint"
            )
        with single_threaded():
            corr = correspondences_from_depth(scene, list(range(n)), stride=depth_stride, rel_depth_tol=rel_depth_tol)
        directed = corr.pair_counts(n)
        counts = torch.minimum(directed, directed.T)
    else:
        raise ValueError(f"source must be 'auto', 'tracks' or 'depth', got {source!r}")
    counts = counts.clone()
    counts.fill_diagonal_(0)
    scene._cache[key] = counts
    return counts.clone()


def _largest_component(adj: np.ndarray, nodes: np.ndarray) -> int:
    best, seen = 0, set()
    for start in nodes.tolist():
        if start in seen:
            continue
        comp, stack = {start}, [start]
        while stack:
            v = stack.pop()
            for u in nodes[adj[v, nodes]].tolist():
                if u not in comp:
                    comp.add(u)
                    stack.append(u)
        seen |= comp
        best = max(best, len(comp))
    return best


def _check_request(scene: PosedScene, num_views: int, num_sets: int, candidates, must_include):
    """Validate a view-set request; ``(candidate views, must-include views, their union)`` as sorted arrays/lists."""
    n = len(scene)
    if n < 2:
        raise SceneError(f"scene {scene.name!r} has {n} view; view sets need at least 2 views")
    if num_views < 2:
        raise SceneError(f"num_views must be >= 2 for multi-view sets, got {num_views}")
    if num_sets < 1:
        raise SceneError(f"num_sets must be >= 1, got {num_sets}")
    cand = np.array(sorted(set(_as_index_list(candidates if candidates is not None else range(n), n, scene.name))))
    must = _as_index_list(must_include, n, scene.name) if must_include is not None else []
    if len(set(must)) != len(must):
        raise SceneError(f"must_include {must} contains duplicates")
    pool = np.array(sorted(set(cand.tolist()) | set(must)))
    if len(pool) < num_views:
        raise SceneError(
            f"cannot sample sets of {num_views} views from {len(pool)} candidate views of scene {scene.name!r}"
        )
    if len(must) > num_views:
        raise SceneError(f"must_include has {len(must)} views but sets have only {num_views}")
    return cand, must, pool


def _grow_set(rng: np.random.Generator, chosen: List[int], num_views: int, cand_mask: np.ndarray,
              adj: np.ndarray) -> Optional[List[int]]:
    """Grow ``chosen`` by random candidate views connected to the set; None if it cannot reach ``num_views``
    or a view of it has no overlapping partner (a must-include view)."""
    in_set = np.zeros(len(cand_mask), dtype=bool)
    in_set[chosen] = True
    while len(chosen) < num_views:
        frontier = np.nonzero(cand_mask & ~in_set & adj[:, in_set].any(axis=1))[0]
        if len(frontier) == 0:
            return None
        v = int(rng.choice(frontier))
        chosen.append(v)
        in_set[v] = True
    members = np.array(chosen)
    return chosen if adj[np.ix_(members, members)].any(axis=1).all() else None


def sample_view_sets(
    scene: PosedScene,
    num_views: int,
    min_shared: int,
    num_sets: int,
    seed: int = 0,
    candidates: Optional[Sequence[int]] = None,
    must_include: Optional[Sequence[int]] = None,
    source: Source = "auto",
    max_attempts_per_set: int = 50,
) -> List[Tuple[int, ...]]:
    """Sample ``num_sets`` sets of ``num_views`` distinct views that overlap.

    In every set each view shares at least ``min_shared`` correspondences (see
    :func:`shared_counts`) with at least one other view of the set. Sets grow from a random
    start view (or from ``must_include``) by adding random views connected to the set, so a set
    is a connected chain/cluster of overlapping views. Distinct sets are returned while they
    can be found; small scenes may repeat sets. Deterministic for a given ``seed``.

    Args:
        scene: the scene.
        num_views: views per set (S >= 2).
        min_shared: minimum correspondences a view shares with some other view of its set
            (0 disables the constraint and needs neither tracks nor depth).
        num_sets: number of sets to return.
        seed: random seed.
        candidates: scene indices allowed in sets (e.g. the training split); default all.
        must_include: scene indices included in every set (they come first, in this order).
        source: where shared correspondences come from (``auto``: tracks, else depth).
    Returns:
        ``num_sets`` tuples of scene view indices; the first view is the start/``must_include[0]``.
    """
    n = len(scene)
    cand, must, pool = _check_request(scene, num_views, num_sets, candidates, must_include)
    if min_shared > 0:
        adj = (shared_counts(scene, source) >= min_shared).numpy()
    else:
        adj = np.ones((n, n), dtype=bool)
    np.fill_diagonal(adj, False)
    cand_mask = np.zeros(n, dtype=bool)
    cand_mask[cand] = True

    rng = np.random.default_rng(seed)
    starts = cand[adj[np.ix_(cand, pool)].any(axis=1)]
    results: List[Tuple[int, ...]] = []
    seen = set()
    attempts = 0
    while len(results) < num_sets and attempts < max_attempts_per_set * num_sets:
        attempts += 1
        if not must and len(starts) == 0:
            break
        chosen = _grow_set(rng, list(must) if must else [int(rng.choice(starts))], num_views, cand_mask, adj)
        if chosen is None:
            continue
        key = tuple(sorted(chosen))
        if key in seen:
            continue
        seen.add(key)
        results.append(tuple(chosen))
    if not results:
        comp = _largest_component(adj, pool)
        raise SceneError(
            f"no set of {num_views} views of scene {scene.name!r} where every view shares >= {min_shared} "
            f"correspondences with another view (largest connected group of views: {comp}"
            + (f", must_include={must}" if must else "")
            + "); lower min_shared or num_views"
        )
    # Small scenes: fewer distinct sets than requested -> cycle through the distinct ones.
    distinct = len(results)
    while len(results) < num_sets:
        results.append(results[len(results) % distinct])
    return results


def split_views(
    scene: PosedScene, holdout_every: Optional[int] = 8, fraction: Optional[float] = None
) -> Tuple[List[int], List[int]]:
    """Deterministic train / held-out split by views.

    Args:
        holdout_every: hold out every k-th view (indices 0, k, 2k, ...; the LLFF convention).
        fraction: instead, hold out this fraction of views, evenly spaced (overrides holdout_every).
    Returns:
        ``(train_indices, heldout_indices)``, both sorted and non-empty.
    """
    n = len(scene)
    if n < 2:
        raise SceneError(f"scene {scene.name!r} has {n} view; a train/held-out split needs at least 2")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise SceneError(f"fraction must be in (0, 1), got {fraction}")
        k = min(n - 1, max(1, int(round(n * fraction))))
        held = sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))
    else:
        if holdout_every is None or holdout_every < 2:
            raise SceneError(f"holdout_every must be >= 2, got {holdout_every}")
        held = list(range(0, n, holdout_every))
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set]
    return train, held


GROUPINGS = ("scene", "neighbors", "cover", "partition")


def group_views(
    cam_to_world: torch.Tensor, views_per_set: int, mode: str = "neighbors", max_views_per_pass: int = 64
) -> List[Tuple[int, ...]]:
    """Multi-view sets of nearby views.

    Each view ``i`` proposes the set {i} + its ``views_per_set - 1`` nearest views (distance
    ``|c_i - c_j| / r + (1 - cos angle(z_i, z_j))``, see
    :func:`~mvfm_nerfstudio.geometry.cameras.view_distances`). ``"neighbors"`` keeps
    every distinct proposal; ``"cover"`` walks the views in order and keeps a view's
    proposal only if the view is not yet in a kept set; ``"partition"`` walks the views in
    order and makes a set of each not yet used view and its nearest not yet used views (the
    last set is filled up with its nearest used views); ``"scene"`` is one set of all views,
    or, above ``max_views_per_pass`` views, a partition into ``ceil(N / max_views_per_pass)``
    pose-compact chunks.

    Args:
        cam_to_world: ``[N, 4, 4]`` OpenCV poses.
        views_per_set: wanted set size S (clipped to N); not used by ``"scene"``.
        mode: one of ``"scene"``, ``"neighbors"``, ``"cover"``, ``"partition"``.
        max_views_per_pass: ``"scene"`` only.

    Returns:
        Sorted index tuples in a deterministic order; every view is in at least one set.
    """
    if mode not in GROUPINGS:
        raise ValueError(f"view_grouping must be one of {', '.join(map(repr, GROUPINGS))}, got {mode!r}")
    if views_per_set < 1 or max_views_per_pass < 1:
        raise ValueError(f"views_per_set and max_views_per_pass must be >= 1, got {views_per_set}, {max_views_per_pass}")
    n = cam_to_world.shape[0]
    if mode == "scene":
        chunks = -(-n // max_views_per_pass)
        return group_views(cam_to_world, -(-n // chunks), "partition") if chunks > 1 else [tuple(range(n))]
    s = min(views_per_set, n)
    if s == 1:
        return [(i,) for i in range(n)]
    if mode == "partition":
        order = select_neighbor_views(n - 1, n, 1, cam_to_world[None].double())[0].tolist()  # all views, nearest first
        used: set = set()
        sets: List[Tuple[int, ...]] = []
        for i in range(n):
            if i in used:
                continue
            members = [i] + [j for j in order[i] if j not in used][: s - 1]
            members += [j for j in order[i] if j not in members][: s - len(members)]  # fill the last set
            used.update(members)
            sets.append(tuple(sorted(members)))
        return sets
    nbrs = select_neighbor_views(s - 1, n, 1, cam_to_world[None].double())[0].tolist()
    proposals = [tuple(sorted([i, *nbrs[i]])) for i in range(n)]
    sets = []
    seen_sets, covered = set(), set()
    for i, p in enumerate(proposals):
        if p in seen_sets or (mode == "cover" and i in covered):
            continue
        sets.append(p)
        seen_sets.add(p)
        covered.update(p)
    return sets
