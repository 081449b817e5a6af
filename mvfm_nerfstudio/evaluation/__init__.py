"""Multi-view consistency evaluation: Loc. Err., PCK, Base Sim., viewpoint curve (``mvfm-eval``)."""

from .grid import (
    cell_centers,
    normalized_to_pixel,
    pixel_to_normalized,
    query_similarity,
    sample_features,
    sample_views,
)
from .metrics import MatchResult, base_similarity, bin_by_angle, match_argmax, summarize_matches, viewpoint_angle

__all__ = [
    "MatchResult",
    "base_similarity",
    "bin_by_angle",
    "cell_centers",
    "match_argmax",
    "normalized_to_pixel",
    "pixel_to_normalized",
    "query_similarity",
    "sample_features",
    "sample_views",
    "summarize_matches",
    "viewpoint_angle",
]
