"""Explainers by name: images -> patch-grid attention maps in [0, 1]."""
from __future__ import annotations

from .base import Explainer, clip_and_rescale, top1_logit_score
from .gradcam import GradCamExplainer
from .rollout import RolloutExplainer, RolloutInternals


def build_explainer(config, backbone_kind: str) -> Explainer:
    """The explainer `config.explainer` names; "auto" picks by tower (ViT: A-TPT's, ResNet: Grad-CAM)."""
    name = config.explainer
    if name == "auto":
        name = "token_grad_rollout" if backbone_kind == "vit" else "gradcam"
    if name == "token_grad_rollout":
        explainer = RolloutExplainer("token_gradient", config.rollout_layers, config.token_site,
                                     config.layer_weights, config.row_normalize, config.clip_quantile,
                                     eps=config.explainer_eps)
    elif name == "grad_rollout":
        explainer = RolloutExplainer("attention_gradient", "all", row_normalize=False,
                                     clip_quantile=config.clip_quantile, eps=config.explainer_eps)
    elif name == "attention_rollout":
        explainer = RolloutExplainer("none", "all", row_normalize=True, clip_quantile=config.clip_quantile,
                                     eps=config.explainer_eps)
    else:
        explainer = GradCamExplainer(config.clip_quantile, config.gradcam_sharpen, config.explainer_eps)
    if backbone_kind not in explainer.supports:
        raise ValueError(f"explainer {name!r} needs a {'/'.join(explainer.supports)} image tower, "
                         f"this model has a {backbone_kind} tower; use explainer='auto'")
    return explainer


__all__ = ["Explainer", "RolloutExplainer", "RolloutInternals", "GradCamExplainer", "build_explainer",
           "clip_and_rescale", "top1_logit_score"]
