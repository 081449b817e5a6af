"""View-set sampling (sets of views that see common structure) and train/held-out view splits."""

from __future__ import annotations

import math
from typing import List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from .correspondences import correspondences_from_depth
from .scene import PosedScene, SceneError, _as_index_list, single_threaded

__all__ = ["DEPTH_SAMPLES_PER_VIEW", "shared_counts", "sample_view_sets", "split_views"]

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
        if must:
            chosen = list(must)
        else:
            if len(starts) == 0:
                break
            chosen = [int(rng.choice(starts))]
        in_set = np.zeros(n, dtype=bool)
        in_set[chosen] = True
        while len(chosen) < num_views:
            frontier = np.nonzero(cand_mask & ~in_set & adj[:, in_set].any(axis=1))[0]
            if len(frontier) == 0:
                break
            v = int(rng.choice(frontier))
            chosen.append(v)
            in_set[v] = True
        if len(chosen) < num_views:
            continue
        members = np.array(chosen)
        if not adj[np.ix_(members, members)].any(axis=1).all():
            continue  # a must_include view without an overlapping partner
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
