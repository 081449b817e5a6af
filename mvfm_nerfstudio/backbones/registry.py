"""Registry of the 2D foundation-model backbones an MVFM can be built on.

Each entry names a timm Vision Transformer and records what the MVFM needs to know
about it without building it: image normalisation, patch size, default resolution,
token width, output feature width and prefix tokens (CLS / registers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Family = Literal["vit", "eva", "sam"]

DEFAULT_BACKBONE = "dinov2_vits14_reg"
"""The backbone every tool uses unless told otherwise: DINOv2 ViT-S/14 with registers, the paper's main model."""


class UnknownBackboneError(KeyError, ValueError):
    """Raised for a backbone name that is not registered (a ValueError too: a user error for the CLIs)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


@dataclass(frozen=True)
class BackboneSpec:
    """Static description of a registered backbone."""

    name: str
    """Registry name used by :func:`mvfm_nerfstudio.create_mvfm`."""
    timm_name: str
    """timm architecture name."""
    pretrained_tag: str
    """timm pretrained tag of the weights ``weights="pretrained"`` loads."""
    family: Family
    """Token layout: ``vit`` (timm VisionTransformer), ``eva`` (RoPE, DINOv3) or ``sam`` (windowed, NHWC, conv neck)."""
    patch_size: int
    """Pixels per patch side; image sizes must be multiples of it."""
    default_image_size: Tuple[int, int]
    """(H, W) the MVFM paper used for this backbone."""
    embed_dim: int
    """Token width inside the transformer (the adapters' width)."""
    feature_dim: int
    """Channels of the output feature map (after the final norm, or SAM's neck)."""
    depth: int
    """Number of transformer blocks."""
    num_prefix_tokens: int
    """Tokens before the patch tokens (CLS + registers); adapters leave them untouched."""
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    description: str
    license: str
    tiny_overrides: Dict[str, object] = field(default_factory=dict)
    """timm constructor overrides for a tiny random-weight test instance of the same architecture."""
    timm_kwargs: Dict[str, object] = field(default_factory=dict)
    """Extra timm constructor arguments always passed (e.g. dynamic image size)."""
    text_tower: Optional[str] = None
    """open_clip model name of the CLIP text tower trained with this image tower (its weights come from the same
    pretrained file); None = the backbone has no text tower, so no text queries (:mod:`mvfm_nerfstudio.text`)."""

    @property
    def timm_pretrained_name(self) -> str:
        return f"{self.timm_name}.{self.pretrained_tag}"


_TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
_DYNAMIC = {"dynamic_img_size": True}

_REGISTRY: Dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names must be unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def _dinov2(name: str, timm_name: str, width: int, regs: int, desc: str) -> BackboneSpec:
    return BackboneSpec(
        name=name, timm_name=timm_name, pretrained_tag="lvd142m", family="vit", patch_size=14,
        default_image_size=(518, 518), embed_dim=width, feature_dim=width, depth=12,
        num_prefix_tokens=1 + regs, mean=IMAGENET_MEAN, std=IMAGENET_STD, description=desc,
        license="apache-2.0", tiny_overrides=_TINY_VIT, timm_kwargs=_DYNAMIC,
    )


register_backbone(_dinov2("dinov2_vits14", "vit_small_patch14_dinov2", 384, 0, "DINOv2 ViT-S/14"))
register_backbone(_dinov2("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2", 384, 4, "DINOv2 ViT-S/14, 4 registers (paper's main model)"))
register_backbone(_dinov2("dinov2_vitb14", "vit_base_patch14_dinov2", 768, 0, "DINOv2 ViT-B/14"))
register_backbone(_dinov2("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2", 768, 4, "DINOv2 ViT-B/14, 4 registers"))

for _name, _timm, _width, _desc in [
    ("dinov3_vits16", "vit_small_patch16_dinov3", 384, "DINOv3 ViT-S/16 (4 registers, RoPE)"),
    ("dinov3_vits16plus", "vit_small_plus_patch16_dinov3", 384, "DINOv3 ViT-S+/16 (paper's DINOv3 model)"),
    ("dinov3_vits16plus_qkvb", "vit_small_plus_patch16_dinov3_qkvb", 384,
     "DINOv3 ViT-S+/16 with q/v biases (the published MV-DINOv3's backbone)"),
    ("dinov3_vitb16", "vit_base_patch16_dinov3", 768, "DINOv3 ViT-B/16"),
]:
    register_backbone(BackboneSpec(
        name=_name, timm_name=_timm, pretrained_tag="lvd1689m", family="eva", patch_size=16,
        default_image_size=(512, 512), embed_dim=_width, feature_dim=_width, depth=12,
        num_prefix_tokens=5, mean=IMAGENET_MEAN, std=IMAGENET_STD, description=_desc,
        license="dinov3-license", tiny_overrides=_TINY_VIT,
    ))

register_backbone(BackboneSpec(
    name="clip_vitb16", timm_name="vit_base_patch16_clip_quickgelu_224", pretrained_tag="openai",
    family="vit", patch_size=16, default_image_size=(512, 512), embed_dim=768, feature_dim=768,
    depth=12, num_prefix_tokens=1, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    description="OpenAI CLIP ViT-B/16 image tower (QuickGELU); text tower for text queries", license="mit",
    tiny_overrides=_TINY_VIT, timm_kwargs=_DYNAMIC, text_tower="ViT-B-16-quickgelu",
))

register_backbone(BackboneSpec(
    name="clip_vitb16_laion", timm_name="vit_base_patch16_clip_384", pretrained_tag="laion2b_ft_in12k_in1k",
    family="vit", patch_size=16, default_image_size=(512, 512), embed_dim=768, feature_dim=768,
    depth=12, num_prefix_tokens=1, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    description="LAION-2B CLIP ViT-B/16 image tower, fine-tuned on ImageNet (the published MV-CLIP's and FiT3D's CLIP)",
    license="apache-2.0", tiny_overrides=_TINY_VIT, timm_kwargs=_DYNAMIC,
))

register_backbone(BackboneSpec(
    name="sam_vitb", timm_name="samvit_base_patch16", pretrained_tag="sa1b", family="sam",
    patch_size=16, default_image_size=(512, 512), embed_dim=768, feature_dim=256, depth=12,
    num_prefix_tokens=0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    description="Segment Anything ViT-B image encoder (256-d after the neck)", license="apache-2.0",
    tiny_overrides={**_TINY_VIT, "global_attn_indexes": (1,), "neck_chans": 32},
))


def text_backbones() -> List[str]:
    """Names of the registered backbones with a CLIP text tower (text queries), sorted."""
    return sorted(name for name, spec in _REGISTRY.items() if spec.text_tower is not None)


def require_text_tower(name: str) -> BackboneSpec:
    """The spec of backbone ``name`` if it has a CLIP text tower.

    Raises:
        UnknownBackboneError: unknown name.
        NoTextTowerError: the backbone has no text tower; the message names those that have one.
    """
    from ..errors import NoTextTowerError

    spec = get_backbone_spec(name)
    if spec.text_tower is None:
        why = (" It is LAION CLIP fine-tuned on ImageNet-12k/1k classification: its projection into CLIP's joint "
               "image-text space was replaced by a classifier, so its features are no longer comparable with text."
               if name == "clip_vitb16_laion" else "")
        raise NoTextTowerError(
            f"backbone {name!r} has no CLIP text tower, so its features cannot be queried with text.{why} "
            f"Backbones with a text tower: {', '.join(text_backbones())} (e.g. --features.backbone clip_vitb16)."
        )
    return spec


def list_backbones() -> List[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Look up a registered backbone.

    Raises:
        UnknownBackboneError: unknown name; the message lists the registered ones and close matches.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}.{hint} Registered backbones: {', '.join(list_backbones())}"
        ) from None
