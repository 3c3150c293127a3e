"""The aggregator interface and its registry: the views' predictions -> one prediction.

Register one with `@AGGREGATORS.register("name")` or, from another package, under the
entry-point group `atpt_plugin.aggregators`; or pass an instance as `aggregator=`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..registry import Component, Registry

AGGREGATORS = Registry("aggregator", "atpt_plugin.aggregators")


@dataclass
class ViewPredictions:
    """Everything an aggregator may read about one test image's views."""

    logits: torch.Tensor  # (K, C) with the tuned prompt (or tuned classifier)
    features: torch.Tensor  # (K, E) L2-normalised image features
    confident: torch.Tensor  # indices of the confident set B
    view_maps: Callable[[torch.Tensor], torch.Tensor]  # view indices -> patch-grid maps
    zero_shot_logits: Optional[torch.Tensor] = None  # (K, C) under the initial prompt
    text_features: Optional[torch.Tensor] = None  # (C, E) of the tuned prompt (CLIP only)
    logit_scale: Optional[torch.Tensor] = None  # (CLIP only)
    logit_bias: Union[float, torch.Tensor] = 0.0  # (CLIP only: SigLIP's learnt bias)


class Aggregator(Component, ABC):
    """`(views: ViewPredictions) -> (C,)` logits of one test image.

    Stay differentiable w.r.t. `views.logits` and `views.features` (adaptive attacks
    differentiate through the aggregation); choices such as a selection are index
    operations. Optional attributes the loop reads:
    - `needs_view_maps`: the aggregator calls `views.view_maps(indices)` (explainer runs);
    - `needs_text`: a reason string when it needs CLIP's text side (refused for classifiers);
    - `views_read(confident, count)`: the view indices whose tuned logits it reads (None:
      all), so a classifier loop recomputes only those.
    A registered class is built with `from_config(config)` if it defines it, else `cls()`.
    """

    registry = AGGREGATORS
    needs_view_maps: bool = False
    needs_text: Union[bool, str] = False

    @abstractmethod
    def __call__(self, views: ViewPredictions) -> torch.Tensor: ...

    def views_read(self, confident: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        return None
