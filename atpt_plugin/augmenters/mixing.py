"""Augmenters: base crops, then a pixel-wise mix x = (1 - lam) * base + lam * augmix(base).

`AugMixAugmenter` (TPT, R-TPT) draws one lam per view; `AttentionMixAugmenter` (A-TPT)
makes lam small where the view's attention map is high, so the discriminative pixels
stay close to the clean base and the background is augmented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .augmix_ops import augmix_pure_mix
from .base import AUGMENTERS, Augmenter
from .crops import center_boxes, crop_views, random_resized_boxes, resize_shorter_side, resized_crops


def upsample_maps(maps: torch.Tensor, size: int) -> torch.Tensor:
    """Patch-grid maps (N,h,w) -> (N,size,size), bilinear."""
    return F.interpolate(maps.unsqueeze(1).float(), size=(size, size), mode="bilinear", align_corners=False).squeeze(1)


def top_k_mask(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean (N,H,W): the ceil(fraction * H * W) highest positions of each map.

    Ties at the cut go to the lowest flat (row-major) indices, on every device: upsampled
    maps have many equal values, and `topk` leaves the choice among them to the kernel.
    """
    flat = maps.flatten(1)
    count = math.ceil(fraction * flat.shape[1])
    cut = torch.kthvalue(flat, flat.shape[1] - count + 1, dim=1, keepdim=True).values  # count-th largest
    above = flat > cut
    at_cut = flat == cut
    still_needed = count - above.sum(dim=1, keepdim=True)
    mask = above | (at_cut & (at_cut.cumsum(dim=1) <= still_needed))
    return mask.reshape(maps.shape)


def quantile_regions(maps: torch.Tensor, p_high: float, p_low: float):
    """The authors' rule: high above the (1 - p_high) quantile, low at or below the p_low one."""
    flat = maps.flatten(1)
    high_cut = torch.quantile(flat, 1 - p_high, dim=1, keepdim=True)
    low_cut = torch.quantile(flat, p_low, dim=1, keepdim=True)
    high = flat > high_cut
    low = (flat <= low_cut) & ~high
    return high.reshape(maps.shape), low.reshape(maps.shape)


def mix(bases: torch.Tensor, augmented: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(1 - lam) * base + lam * augmented; lam broadcasts as (N,), (N,H,W) or (N,1,H,W)."""
    while lam.dim() < bases.dim():
        lam = lam.unsqueeze(1) if lam.dim() == 3 else lam.unsqueeze(-1)
    return (1 - lam) * bases + lam * augmented


@AUGMENTERS.register("augmix")
class AugMixAugmenter(Augmenter):
    """TPT's views: random crops + flips, AugMix-ed with one Beta(1,1) weight per view."""

    def __init__(self, base_crop: str = "random_resized", augmix_ops: bool = True, crop_source: str = "resized"):
        self.base_crop = base_crop
        self.augmix_ops = augmix_ops
        self.crop_source = crop_source

    @classmethod
    def from_config(cls, config) -> "AugMixAugmenter":
        return cls(config.base_crop, config.augmix_ops, config.crop_source)

    def bases(self, image: torch.Tensor, count: int, generator: torch.Generator, size: int) -> torch.Tensor:
        """`count` base views of a (3,H,W) image, as one batch on its device: crops of the image
        resized to the model size, or (`crop_source="original"`, the authors' code) of the image itself."""
        if self.crop_source == "original":
            return resized_crops(image, *self.crop_boxes(image.shape[-2:], count, generator), size)
        source = resize_shorter_side(image, size)
        return crop_views(source, *self.crop_boxes(source.shape[-2:], count, generator), size)

    def crop_boxes(self, shape, count: int, generator: torch.Generator):
        """(boxes (count, 4) as (top, left, h, w) on an image of `shape` (H, W), flips (count,))."""
        height, width = shape
        if self.base_crop == "random_resized":
            boxes = random_resized_boxes(count, height, width, generator)
        else:
            boxes = center_boxes(count, height, width)
        return boxes, torch.rand(count, generator=generator) < 0.5

    def views(self, bases: torch.Tensor, maps, generator: torch.Generator) -> torch.Tensor:
        if not self.augmix_ops:
            return bases
        augmented = augmix_pure_mix(bases, generator)
        return mix(bases, augmented, self.mixing_weights(bases, maps, generator))

    def mixing_weights(self, bases, maps, generator) -> torch.Tensor:
        m = torch.rand(bases.shape[0], generator=generator)  # Beta(1, 1) is Uniform(0, 1)
        return (1 - m).to(bases.device, bases.dtype)


@AUGMENTERS.register("attention_mix")
class AttentionMixAugmenter(AugMixAugmenter):
    """A-TPT's non-uniform AugMix: lam = m_high on high-attention pixels, m_low elsewhere."""

    def __init__(
        self,
        base_crop: str = "center",
        augmix_ops: bool = True,
        mask_rule: str = "top_k",
        r: float = 0.2,
        m_high: float = 0.2,
        m_low: float = 0.8,
        p_high: float = 0.2,
        p_low: float = 0.8,
        crop_source: str = "resized",
    ):
        super().__init__(base_crop, augmix_ops, crop_source)
        self.mask_rule = mask_rule
        self.r, self.m_high, self.m_low = r, m_high, m_low
        self.p_high, self.p_low = p_high, p_low

    @classmethod
    def from_config(cls, config) -> "AttentionMixAugmenter":
        return cls(
            config.base_crop,
            config.augmix_ops,
            config.mask_rule,
            config.r,
            config.m_high,
            config.m_low,
            config.p_high,
            config.p_low,
            config.crop_source,
        )

    @property
    def needs_maps(self) -> bool:
        return self.augmix_ops

    def mixing_weights(self, bases, maps, generator) -> torch.Tensor:
        if maps is None:
            raise ValueError("the attention mix needs one attention map per base view")
        pixels = upsample_maps(maps, bases.shape[-1]).to(bases.device)
        if self.mask_rule == "top_k":
            high = top_k_mask(pixels, self.r)
            return torch.where(high, self.m_high, self.m_low).to(bases.dtype)
        high, low = quantile_regions(pixels, self.p_high, self.p_low)
        middle = super().mixing_weights(bases, None, generator)[:, None, None].expand_as(pixels)
        lam = torch.where(high, self.m_high, torch.where(low, self.m_low, middle))
        return lam.to(bases.dtype)
