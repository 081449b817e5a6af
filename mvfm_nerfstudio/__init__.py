"""mvfm-nerfstudio: multi-view foundation models (MV-Adapters on timm ViTs) and a Nerfstudio plugin.

Core API (no Nerfstudio imports)::

    import mvfm_nerfstudio as mvfm
    mvfm.list_backbones()
    model = mvfm.create_mvfm("dinov2_vits14_reg", weights="pretrained")
    feats = model(images, intrinsics, cam_to_world)   # [B, S, F, h, w]
    base = model.forward_base(images)                 # frozen base model, same layout
"""

from ._compat import check_timm_version

check_timm_version()

from ._version import __version__  # noqa: E402
from .backbones import (  # noqa: E402
    BackboneSpec,
    CheckpointMismatchError,
    ImageSizeError,
    UnknownBackboneError,
    WeightsUnavailableError,
    create_backbone,
    get_backbone_spec,
    list_backbones,
)
from .geometry.cameras import CameraError  # noqa: E402
from .models.mvfm import MultiViewFoundationModel, MVFMConfig, create_mvfm  # noqa: E402

__all__ = [
    "__version__",
    "BackboneSpec",
    "CameraError",
    "CheckpointMismatchError",
    "ImageSizeError",
    "MVFMConfig",
    "MultiViewFoundationModel",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "create_backbone",
    "create_mvfm",
    "get_backbone_spec",
    "list_backbones",
]
