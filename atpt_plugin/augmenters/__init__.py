"""Augmenters: a test image (+ attention maps of its bases) -> a batch of views."""

from __future__ import annotations

from .base import AUGMENTERS, Augmenter
from .crops import center_view
from .mixing import AttentionMixAugmenter, AugMixAugmenter

__all__ = ["AUGMENTERS", "Augmenter", "AugMixAugmenter", "AttentionMixAugmenter", "center_view"]
