"""Multi-view consistency evaluation: Loc. Err., PCK, Base Sim., viewpoint curve (``mvfm-eval``)."""

from .metrics import MatchResult, base_similarity, bin_by_angle, match_argmax, summarize_matches, viewpoint_angle

__all__ = [
    "MatchResult",
    "base_similarity",
    "bin_by_angle",
    "match_argmax",
    "summarize_matches",
    "viewpoint_angle",
]
