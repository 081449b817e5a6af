"""Query features on disk (``query_feature.safetensors``) and their re-expression in another feature space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..utils.io import atomic_write

__all__ = ["QueryFeature", "save_query", "save_store_query", "load_query", "query_in_space"]


@dataclass
class QueryFeature:
    """A query feature and where it lives.

    Attributes:
        query: ``[D]`` in the feature space named by ``metadata["feature_space"]``.
        query_full: ``[D_full]`` the same feature in the backbone's full channel space
            (``reduction.unproject(query)``) when the features were PCA-reduced, else None.
        metadata: strings (backbone, weights, feature_space, scene, view, pixel, ...).
    """

    query: torch.Tensor
    query_full: Optional[torch.Tensor]
    metadata: Dict[str, str]


def save_query(path: Union[str, Path], q: QueryFeature) -> None:
    """Write a query feature to ``.safetensors`` (tensors ``query`` and optionally ``query_full``; atomic)."""
    from safetensors.torch import save

    tensors = {"query": q.query.detach().float().cpu().contiguous()}
    if q.query_full is not None:
        tensors["query_full"] = q.query_full.detach().float().cpu().contiguous()
    atomic_write(path, save(tensors, metadata={k: str(v) for k, v in q.metadata.items()}))


def save_store_query(path: Union[str, Path], query: torch.Tensor, store, metadata: Dict[str, str],
                     query_full: Optional[torch.Tensor] = None) -> None:
    """Write ``query [D]``, a feature in the space of the prepared feature ``store``, with that space's description
    (backbone, weights, feature_space, feature_dim, reduced) added to ``metadata``, so any tool can re-express it
    (:func:`query_in_space`). ``query_full``: the full-channel feature; default ``reduction.unproject(query)`` when
    the store's features are PCA-reduced (pass it when the exact one is known: a text embedding)."""
    reduction = store.reduction_basis
    meta = {**metadata, "backbone": store.config.backbone, "weights": str(store.config.weights),
            "feature_space": store.path.name, "feature_dim": str(store.feature_dim),
            "reduced": "1" if reduction is not None else "0"}
    if query_full is None and reduction is not None:
        query_full = reduction.unproject(query)
    save_query(path, QueryFeature(query, query_full, meta))


def load_query(path: Union[str, Path]) -> QueryFeature:
    """Read a file written by :func:`save_query` (or any safetensors file with a 1-D ``query`` tensor)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query feature file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        if "query" not in keys:
            raise ValueError(f"{path} has no 'query' tensor (found {sorted(keys)}); write it with save_query")
        query = f.get_tensor("query").float()
        full = f.get_tensor("query_full").float() if "query_full" in keys else None
        meta = dict(f.metadata() or {})
    if query.ndim != 1:
        raise ValueError(f"{path}: 'query' must be a 1-D feature vector, got shape {tuple(query.shape)}")
    return QueryFeature(query, full, meta)


def query_in_space(q: QueryFeature, space: str, backbone: str, dim: int, reduction, source: str) -> torch.Tensor:
    """Express a saved query in the current feature space (``dim`` channels, PCA ``reduction`` or None).

    Same space (``metadata["feature_space"]``): used as is. Otherwise through the backbone's full
    channel space: ``query_full`` (or ``query`` itself when it was saved unreduced,
    ``metadata["reduced"] == "0"``), projected with the current reduction. A file without
    metadata is taken as a feature of the current space if it has ``dim`` channels, else as a
    full backbone feature.
    """
    d_full = reduction.components.shape[1] if reduction is not None else dim
    if "feature_space" not in q.metadata:
        if q.query.numel() == dim:
            return q.query
        full = q.query
    else:
        if q.metadata["feature_space"] == space and q.query.numel() == dim:
            return q.query
        saved_backbone = q.metadata.get("backbone")
        if saved_backbone is not None and saved_backbone != backbone:
            raise ValueError(f"query feature {source} comes from backbone {saved_backbone!r}, but the features here "
                             f"are from {backbone!r}: use the same backbone (--features.backbone {saved_backbone})")
        full = q.query_full if q.query_full is not None else q.query if q.metadata.get("reduced") == "0" else None
        if full is None:
            raise ValueError(f"query feature {source} was saved in another PCA-reduced feature space without "
                             "'query_full'; re-create it from a pixel, or use the same scene and feature settings")
    if full.numel() != d_full:
        raise ValueError(f"query feature {source} has {full.numel()} channels; the features here have {dim}"
                         + (f" ({d_full} before PCA)" if reduction is not None else ""))
    return reduction.project(full) if reduction is not None else full
