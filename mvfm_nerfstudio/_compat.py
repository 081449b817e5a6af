"""Import-time checks for the dependency that pip cannot resolve for us."""

from __future__ import annotations

MIN_TIMM = (1, 0, 15)
FIX = (
    'pip install --no-deps "timm>=1.0.15,<2"  '
    "(nerfstudio 1.1.5 pins timm==0.6.7 but never imports it; see README, 'Installation')"
)


def _parse(version: str) -> tuple:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def check_timm_version(version: "str | None" = None) -> None:
    """Raise ImportError with the fix if timm is missing or older than 1.0.15 (no DINOv2/v3 registers, no SAM)."""
    if version is None:
        try:
            import timm
        except ImportError as err:
            raise ImportError(f"mvfm_nerfstudio needs timm >= 1.0.15, which is not installed. Fix: {FIX}") from err
        version = timm.__version__
    if _parse(version) < MIN_TIMM:
        raise ImportError(
            f"mvfm_nerfstudio needs timm >= 1.0.15 (DINOv2/DINOv3/SAM ViTs), found timm {version}. Fix: {FIX}"
        )
