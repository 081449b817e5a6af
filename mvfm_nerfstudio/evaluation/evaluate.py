"""Base vs MVFM multi-view consistency on the same view sets (the core of ``mvfm-eval``).

Every set is run through the MVFM (all S views jointly, with cameras) and through the frozen
base model; both are matched with the same hard-argmax protocol (:mod:`.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence

import torch

from ..utils.progress import track
from .metrics import MatchResult, base_similarity, bin_by_angle, match_argmax, summarize_matches, viewpoint_angle

if TYPE_CHECKING:
    from ..data.scene_data import SceneData, ViewSet

__all__ = ["EvalResult", "evaluate_sets", "DEFAULT_PCK_THRESHOLDS"]

DEFAULT_PCK_THRESHOLDS = (7.0, 14.0, 28.0)
"""Pixels of the evaluated images: half a DINOv2 patch, one patch, two patches."""


@dataclass
class EvalResult:
    """Per-correspondence results of one scene (all ``[P]`` tensors concatenated over sets)."""

    scene: str
    image_size: tuple
    loc_err: Dict[str, torch.Tensor]
    """'base' / 'mvfm' -> Loc. Err. per correspondence."""
    pixel_err: Dict[str, torch.Tensor]
    """'base' / 'mvfm' -> pixel error per correspondence."""
    angle: torch.Tensor
    """Angle (degrees) between the central rays of each correspondence's two views."""
    heldout_pair: torch.Tensor
    """True where the query or target view is a held-out view."""
    base_sim: torch.Tensor
    """Mean cosine between MVFM and base features, per evaluated view."""
    num_sets: int
    base_sim_by_model: Dict[str, torch.Tensor] = field(default_factory=dict)
    """Model name -> mean cosine to the base features per evaluated view ('mvfm' and every extra model)."""
    example: Optional[Dict[str, object]] = field(default=None, repr=False)
    """First set's images, correspondences and predictions (for the match plot)."""

    def summary(self, pck_thresholds: Sequence[float] = DEFAULT_PCK_THRESHOLDS, angle_bin_deg: float = 5.0) -> Dict:
        """JSON-able metrics: per model Loc. Err. / PCK over all matches and over held-out pairs, Base Sim., curve."""
        out: Dict[str, object] = {"scene": self.scene, "image_size": list(self.image_size), "num_sets": self.num_sets}
        for name in self.loc_err:
            out[name] = summarize_matches(self.loc_err[name], self.pixel_err[name], pck_thresholds)
            held = self.heldout_pair
            out[name]["heldout_pairs"] = summarize_matches(
                self.loc_err[name][held], self.pixel_err[name][held], pck_thresholds
            )
        out["base_sim"] = float(self.base_sim.mean()) if self.base_sim.numel() else float("nan")
        if self.base_sim_by_model:
            out["base_sim_by_model"] = {k: float(v.mean()) if v.numel() else float("nan")
                                        for k, v in self.base_sim_by_model.items()}
        out["viewpoint_curve"] = bin_by_angle(self.angle, self.loc_err, angle_bin_deg)
        out["angle_bin_deg"] = angle_bin_deg
        return out


@torch.no_grad()
def evaluate_sets(
    model,
    data: "SceneData",
    sets: List["ViewSet"],
    include_base: bool = True,
    progress: bool = False,
    others: Optional[Dict[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
) -> EvalResult:
    """Match every correspondence of every set with MVFM (and base) features.

    Args:
        model: a :class:`~mvfm_nerfstudio.models.mvfm.MultiViewFoundationModel` (set to eval mode here
            and restored afterwards).
        data: the scene at its evaluation resolution; its cached base features are used if present.
        sets: view sets with correspondences in pixels of ``data.size``.
        include_base: also evaluate the base model.
        progress: show a rich progress bar.
        others: more single-view models evaluated on the same sets, name -> ``[N, 3, H, W]`` images in [0, 1] ->
            ``[N, C, h, w]`` features (e.g. a FiT3D backbone); their Base Sim. is to the base features too.
    """
    others = dict(others or {})
    if not sets:
        raise ValueError(f"no view sets to evaluate for scene {data.name!r}")
    was_training = model.training
    model.eval()
    names = (["base", "mvfm"] if include_base else ["mvfm"]) + list(others)
    sims_by = {n: [] for n in ["mvfm", *others]}
    loc = {n: [] for n in names}
    pix = {n: [] for n in names}
    angles, held, sims = [], [], []
    heldout = torch.zeros(len(data.scene), dtype=torch.bool)  # device: CPU bookkeeping of view indices
    heldout[data.heldout_views] = True
    example = None
    device = next(model.parameters()).device
    for vs in track(sets, description=f"evaluating {data.name}", enabled=progress):
        idx = torch.as_tensor(vs.views, dtype=torch.long)
        images, k, c2w = data.inputs(vs.views)  # cameras stay on the CPU (the MVFM normalises them there)
        images = images.to(device)
        feats = model(images, k, c2w)[0]
        base = data.base[idx].to(device) if data.base is not None else model.forward_base(images)[0]
        corr = vs.corr.to(device)
        extra = {name: fn(images[0]) for name, fn in others.items()}
        results: Dict[str, MatchResult] = {}
        for name in names:
            f = feats if name == "mvfm" else extra[name] if name in extra else base
            results[name] = match_argmax(f, corr, data.size)
            loc[name].append(results[name].loc_err.cpu())
            pix[name].append(results[name].pixel_err.cpu())
        cams = c2w[0].cpu()
        angles.append(viewpoint_angle(cams[vs.corr.src_view], cams[vs.corr.dst_view]))
        held.append(heldout[idx[vs.corr.src_view]] | heldout[idx[vs.corr.dst_view]])
        sims.append(base_similarity(feats, base).flatten(1).mean(1).cpu())
        for name, f in (("mvfm", feats), *extra.items()):
            sims_by[name].append(base_similarity(f, base).flatten(1).mean(1).cpu())
        if example is None:
            example = {
                "images": images[0].cpu(), "views": vs.views, "corr": vs.corr,
                "pred_xy": {n: r.pred_xy.cpu() for n, r in results.items()},
            }
    model.train(was_training)
    return EvalResult(
        scene=data.name, image_size=tuple(data.size),
        loc_err={n: torch.cat(v) for n, v in loc.items()}, pixel_err={n: torch.cat(v) for n, v in pix.items()},
        angle=torch.cat(angles), heldout_pair=torch.cat(held), base_sim=torch.cat(sims), num_sets=len(sets),
        example=example, base_sim_by_model={n: torch.cat(v) for n, v in sims_by.items()} if others else {},
    )
