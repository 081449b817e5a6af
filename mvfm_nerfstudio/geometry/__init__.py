"""Camera conventions, normalisation and Plücker rays (see :mod:`.cameras`)."""

from .cameras import *  # noqa: F401,F403
from .cameras import __all__  # noqa: F401
