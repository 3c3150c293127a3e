"""Checks on the images a wrapped model receives: fail loudly, never answer wrongly."""

from __future__ import annotations

import torch


def check_images(images) -> torch.Tensor:
    """(B,3,H,W) float images in [0,1]; a 1-channel batch is repeated to 3 channels.

    Any H and W are accepted: each image is resized (shorter side) and center-cropped
    to the model's input size inside the adapter, as open_clip's preprocessing does.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (B,3,H,W), got {type(images).__name__}")
    if images.dim() == 3:
        raise ValueError(
            f"images must be a batch (B,3,H,W), got shape {tuple(images.shape)}; for one image pass image.unsqueeze(0)"
        )
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B,3,H,W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floats in [0,1], got dtype {images.dtype}; for uint8 images use images.float() / 255"
        )
    channels = images.shape[1]
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif channels != 3:
        raise ValueError(
            f"images must have 1 or 3 channels in dimension 1 (B,C,H,W), got {channels}; "
            "channels-last batches need images.permute(0, 3, 1, 2)"
        )
    if images.numel() and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must be in [0,1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]; "
            "pass unnormalised images: the adapter applies the model's mean/std itself "
            "(drop transforms.Normalize from your preprocessing)"
        )
    return images


def quantize_images(images: torch.Tensor, rule) -> torch.Tensor:
    """`rule="uint8_floor"`: x -> floor(255 x) / 255, the authors' `ToPILImage` round trip of
    adversarial images (`mul(255).byte()` truncates; docs/method.md §9.6). None: unchanged.

    An fp32 image already on the 1/255 grid (uint8 / 255, as decoders and torchvision make
    it) stays exactly as it is: 255 * (k / 255) rounds back to k. The gradient passes
    straight through (BPDA), so the rounding cannot mask the input gradient from an attack.
    """
    if rule is None:
        return images
    quantized = torch.floor(images.detach() * 255) / 255
    return quantized + (images - images.detach())  # exactly `quantized`, with the identity's gradient
