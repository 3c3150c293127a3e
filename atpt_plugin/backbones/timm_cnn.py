"""Convolutional and hierarchical timm models (ResNet, ConvNeXt, EfficientNet, FastViT, Swin,
MambaOut, ...) for Grad-CAM on their last feature map: as image classifiers, and as the trunk
of an open_clip `TimmModel` tower (ConvNeXt CLIP, MobileCLIP), where `projection` is
open_clip's head over the trunk's pooled output. Channels-last maps (`output_fmt="NHWC"`,
Swin, MambaOut) are handed to Grad-CAM as NCHW and back to the head as NHWC."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .base import BACKBONES
from .timm_common import TimmImage, data_config, is_timm_model


@BACKBONES.register("timm_cnn")
class TimmCnnBackbone(TimmImage):
    """A timm conv net for Grad-CAM on its last feature map (`forward_features`, NCHW).

    `kind` is "resnet" because that is the tower kind the Grad-CAM explainer takes; the
    attention explainers need a ViT. For a classifier `trace_resnet` returns the feature map
    twice: it is what the classifier head reads (`classify` = `model.forward_head`) and what
    Grad-CAM weights; for a tower it returns the embedding `projection(model.forward_head(map))`.
    """

    fallback = True  # any timm model the token-transformer families do not take

    kind = "resnet"
    num_blocks = 0

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Any other timm model; token transformers outside the ViT and EVA classes are refused when built."""
        return is_timm_model(model)

    def __init__(
        self,
        model: nn.Module,
        image_size: Optional[int] = None,
        projection: Optional[nn.Module] = None,
        mean=None,
        std=None,
    ):
        if hasattr(model, "num_prefix_tokens"):  # a token-based transformer outside the ViT family
            raise NotImplementedError(
                f"timm {type(model).__name__} is a token transformer outside timm's VisionTransformer and Eva "
                "classes: the attention explainers cover VisionTransformer and its subclasses (ViT, DeiT, DeiT-III, "
                "register, hybrid and SigLIP ViTs, ...) and Eva (EVA-02, EVA-CLIP), the Grad-CAM fallback covers "
                "conv nets (NCHW feature maps)"
            )
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise NotImplementedError(
                f"{type(model).__name__} has no forward_features/forward_head; the Grad-CAM fallback "
                "needs a timm model that exposes them"
            )
        fmt = getattr(model, "output_fmt", "NCHW")
        if fmt not in ("NCHW", "NHWC"):
            raise NotImplementedError(
                f"{type(model).__name__} returns {fmt} features; the Grad-CAM fallback takes NCHW or NHWC "
                "feature maps, the attention explainers timm VisionTransformers and Evas"
            )
        self.channels_last = fmt == "NHWC"
        self._setup(model, projection, mean, std)
        if image_size is None:
            image_size = data_config(model).get("input_size", (3, 224, 224))[-2]
        self.image_size = int(image_size)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) last feature map, whatever the model's layout."""
        features = self.model.forward_features(x)
        if self.channels_last and features.dim() == 4:
            features = features.permute(0, 3, 1, 2)
        channels = getattr(self.model, "num_features", None)
        if features.dim() != 4 or (channels is not None and features.shape[1] != channels):
            raise NotImplementedError(
                f"{type(self.model).__name__}.forward_features gave shape {tuple(features.shape)}, not an "
                f"(N, {channels}, h, w) feature map; Grad-CAM needs a conv net"
            )
        return features

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """`model.forward_head` on an (N, C, h, w) map, in the layout the model gives it."""
        return self.model.forward_head(feature_map.permute(0, 2, 3, 1) if self.channels_last else feature_map)

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            raise ValueError("this backbone projects its features (an image tower); it has no classifier head")
        return self.head(feature_map)

    def trace_resnet(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = self.feature_map(self.normalize(images))
        features = features.detach().requires_grad_(True)
        if self.projection is None:
            return features, features
        return self.projection(self.head(features)).float(), features

    def trace(self, images: torch.Tensor, first_block: int = 0):
        raise NotImplementedError(
            f"{type(self.model).__name__} is not a ViT: the attention rollouts need a timm "
            "VisionTransformer or Eva; use explainer='gradcam' (or 'auto')"
        )
