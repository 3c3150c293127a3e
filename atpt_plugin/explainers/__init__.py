"""Explainers: images -> patch-grid attention maps in [0, 1], by name or as objects."""

from __future__ import annotations

from ..registry import resolve
from .base import EXPLAINERS, Explainer, clip_and_rescale, top1_logit_score
from .gradcam import GradCamExplainer
from .rollout import RolloutExplainer, RolloutInternals

AUTO = "auto"  # the backbone's own default: A-TPT's rollout on ViTs, Grad-CAM on ResNets


def build_explainer(config, backbone, spec=None) -> Explainer:
    """The explainer `spec` (default `config.explainer`) names or is, checked against the tower."""
    spec = config.explainer if spec is None else spec
    if spec == AUTO:
        spec = backbone.default_explainer
    explainer = resolve(EXPLAINERS, spec, config)
    if backbone.unexplained:
        raise NotImplementedError(
            f"{backbone.unexplained}. Adapters that need no explainer (zeroshot, tpt, "
            "tpt_ens, rtpt, mta) still run on this model"
        )
    if backbone.kind not in explainer.supports:
        raise ValueError(
            f"explainer {spec!r} needs a {'/'.join(explainer.supports)} image tower, "
            f"this model has a {backbone.kind} tower; use explainer='auto'"
        )
    return explainer


__all__ = [
    "AUTO",
    "EXPLAINERS",
    "Explainer",
    "RolloutExplainer",
    "RolloutInternals",
    "GradCamExplainer",
    "build_explainer",
    "clip_and_rescale",
    "top1_logit_score",
]
