"""Moved to :mod:`mvfm_nerfstudio.feature_store` (it has no Nerfstudio dependency); re-exported for old imports."""

from ..feature_store import *  # noqa: F401,F403
from ..feature_store import resize_feature_map  # noqa: F401
