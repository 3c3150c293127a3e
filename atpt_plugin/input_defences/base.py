"""The input-defence interface and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..registry import Component, Registry

INPUT_DEFENCES = Registry("input defence", "atpt_plugin.input_defences")


class InputDefence(Component, ABC):
    """`__call__(backbone, images (B,3,H,W) in [0,1], generators: one per image) -> defended images`.

    The backbone gives what a defence may read (`embed_image`, `encode_image`, `image_size`,
    `normalize`); the defence never changes the model.
    """

    registry = INPUT_DEFENCES

    @abstractmethod
    def __call__(self, backbone, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor: ...
