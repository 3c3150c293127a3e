"""Grad-CAM on the last stage of a ResNet tower (the paper's explainer for CLIP RN50)."""

from __future__ import annotations

import torch

from .base import EXPLAINERS, Explainer, Score, clip_and_rescale


def gradcam(feature_map: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """relu(sum_c mean_spatial(dS/dF_c) * F_c) per image: (N, C, h, w) -> (N, h, w)."""
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    return torch.relu((weights * feature_map.float()).sum(dim=1))


def sharpen(maps: torch.Tensor, offset: float = 0.2, eps: float = 0.0) -> torch.Tensor:
    """The authors' RN50 post-step on [0,1] maps: (relu(map - offset) / (max + eps)) ** 2."""
    shifted = torch.relu(maps - offset)
    peak = (shifted.flatten(1).max(dim=1).values + eps).clamp_min(torch.finfo(maps.dtype).tiny)
    return (shifted / peak[:, None, None]) ** 2


@EXPLAINERS.register("gradcam")
class GradCamExplainer(Explainer):
    """Grad-CAM on the last feature map (ResNet towers such as CLIP RN50, timm conv nets)."""

    supports = ("resnet",)

    @classmethod
    def from_config(cls, config) -> "GradCamExplainer":
        return cls(config.clip_quantile, config.gradcam_sharpen, config.explainer_eps)

    def __init__(self, clip_quantile: float = 0.99, sharpen: bool = False, eps: float = 0.0):
        self.clip_quantile = clip_quantile
        self.sharpen = sharpen
        self.eps = eps

    def __call__(self, backbone, images: torch.Tensor, score: Score) -> torch.Tensor:
        with torch.enable_grad():
            pooled, feature_map = backbone.trace_resnet(images)
            (grads,) = torch.autograd.grad(score(pooled), [feature_map])
        maps = clip_and_rescale(gradcam(feature_map.detach(), grads), self.clip_quantile, self.eps)
        return sharpen(maps, eps=self.eps) if self.sharpen else maps
