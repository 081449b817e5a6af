"""Probes on frozen (base or MVFM) features: surface normals with a multi-view DPT head.

::

    from mvfm_nerfstudio.probes import load_probe, predict_normals
    probe, meta = load_probe("outputs/mvfm-normals/head.safetensors")
    pred = predict_normals(model, probe, images, intrinsics, cam_to_world)   # pred.world [B, S, 3, H, W]

Training and evaluation: :mod:`.train` (``mvfm-normals train`` / ``eval``); docs/normals.md.
"""

from .config import NormalsEvalConfig, NormalsTrainConfig, list_normals_presets, load_normals_preset
from .head import MultiViewNormalHead, NormalHeadConfig, normal_loss
from .normals import NormalPrediction, NormalProbe, load_probe, predict_normals, save_probe
from .train import evaluate_normal_probe, run_normals_eval, train_normal_probe

__all__ = [
    "NormalsEvalConfig",
    "NormalsTrainConfig",
    "list_normals_presets",
    "load_normals_preset",
    "MultiViewNormalHead",
    "NormalHeadConfig",
    "normal_loss",
    "NormalPrediction",
    "NormalProbe",
    "load_probe",
    "predict_normals",
    "save_probe",
    "evaluate_normal_probe",
    "run_normals_eval",
    "train_normal_probe",
]
