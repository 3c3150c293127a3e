"""The augmenter interface and its registry: a test image (+ its bases' maps) -> views.

Register one with `@AUGMENTERS.register("name")` or, from another package, under the
entry-point group `atpt_plugin.augmenters`; or pass an instance as `augmenter=`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from ..registry import Component, Registry

AUGMENTERS = Registry("augmenter", "atpt_plugin.augmenters")


class Augmenter(Component, ABC):
    """Two steps, so the loop can explain all bases of a batch of images in one pass:

    - `bases(image (3,H,W) in [0,1], count, generator, size) -> (count,3,size,size)`;
    - `views(bases, maps (count,h,w) in [0,1] or None, generator) -> (count,3,size,size)`.
    `needs_maps` says whether `views` reads the bases' attention maps (the loop then runs
    the explainer). All randomness comes from `generator`, so a view set depends only on
    the seed and the image. A registered class is built with `from_config(config)` if it
    defines it, else `cls()`.
    """

    registry = AUGMENTERS
    needs_maps: bool = False

    @abstractmethod
    def bases(self, image: torch.Tensor, count: int, generator: torch.Generator, size: int) -> torch.Tensor: ...

    @abstractmethod
    def views(self, bases: torch.Tensor, maps: Optional[torch.Tensor], generator: torch.Generator) -> torch.Tensor: ...
