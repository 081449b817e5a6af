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
from .backbones.registry import BackboneSpec, UnknownBackboneError, get_backbone_spec, list_backbones  # noqa: E402
from .backbones.vit import ImageSizeError, create_backbone  # noqa: E402
from .errors import CheckpointMismatchError, SceneError, WeightsUnavailableError  # noqa: E402
from .geometry.cameras import CameraError  # noqa: E402
from .models.build import ModelSpec, build_model, create_mvfm  # noqa: E402
from .models.config import MVFMConfig  # noqa: E402
from .models.mvfm import MultiViewFoundationModel  # noqa: E402

__all__ = [
    "__version__",
    "BackboneSpec",
    "CameraError",
    "CheckpointMismatchError",
    "ImageSizeError",
    "MVFMConfig",
    "ModelSpec",
    "MultiViewFoundationModel",
    "SceneError",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "build_model",
    "create_backbone",
    "create_mvfm",
    "get_backbone_spec",
    "list_backbones",
]
