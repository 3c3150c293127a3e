"""Augmenters by name: a test image (+ attention maps of its bases) -> a batch of views."""
from __future__ import annotations

from .crops import center_view
from .mixing import AttentionMixAugmenter, AugMixAugmenter


def build_augmenter(config, image_size: int):
    if config.augmenter == "augmix":
        return AugMixAugmenter(image_size, config.base_crop, config.augmix_ops, config.crop_source)
    return AttentionMixAugmenter(image_size, config.base_crop, config.augmix_ops, config.mask_rule,
                                 config.r, config.m_high, config.m_low, config.p_high, config.p_low,
                                 config.crop_source)


__all__ = ["AugMixAugmenter", "AttentionMixAugmenter", "build_augmenter", "center_view"]
