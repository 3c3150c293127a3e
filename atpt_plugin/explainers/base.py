"""The explainer interface, its registry and the map post-processing every explainer shares.

Register an explainer with `@EXPLAINERS.register("name")` or, from another package, under
the entry-point group `atpt_plugin.explainers`; or pass an instance as `explainer=`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from ..registry import Component, Registry

EXPLAINERS = Registry("explainer", "atpt_plugin.explainers")
Score = Callable[[torch.Tensor], torch.Tensor]
"""Maps image embeddings (N, E) to the scalar S whose gradients explain them."""


class Explainer(Component, ABC):
    """`(backbone, images (N,3,S,S) in [0,1], score) -> maps (N, h, w) in [0,1]` on the patch grid.

    `score(embeddings) -> scalar` is what the maps explain (a sum over images, so each
    image gets its own gradient). Guarantees the loop relies on: one forward and one
    backward for the whole batch; only activation gradients (`torch.autograd.grad` with
    explicit inputs), never parameter gradients, so the model is left untouched; an
    image's map does not depend on the rest of the batch. `supports` lists the backbone
    kinds it reads ("vit": `backbone.trace`, "resnet": `backbone.trace_resnet`).
    A registered class is built with `from_config(config)` if it defines it, else `cls()`.
    """

    registry = EXPLAINERS
    supports = ("vit",)

    @abstractmethod
    def __call__(self, backbone, images: torch.Tensor, score: Score) -> torch.Tensor: ...


def top1_logit_score(text_features: torch.Tensor, logit_scale: torch.Tensor, logit_bias=0.0) -> Score:
    """S(x) = sum over the batch of each image's top-1 logit under fixed text features
    (`logit_scale * cos + logit_bias`, SigLIP's bias included).

    Images do not interact through a sum, so the batch gives every image its own gradient.
    """

    def score(embeddings: torch.Tensor) -> torch.Tensor:
        features = torch.nn.functional.normalize(embeddings, dim=-1)
        return (logit_scale * features @ text_features.t() + logit_bias).max(dim=-1).values.sum()

    return score


def clip_threshold(maps: torch.Tensor, quantile: float = 0.99) -> torch.Tensor:
    """(N,) the value each map is clipped at: its `quantile`."""
    return torch.quantile(maps.flatten(1).float(), quantile, dim=1)


def rescale(maps: torch.Tensor, threshold: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Clip each map at its threshold, then min-max scale it to [0, 1] (constant map -> 0).

    `eps` is added to the span, as the authors' code does (1e-8): on a near-flat map that
    moves the result far more than rounding does, so it is a setting, not a detail.
    """
    flat = torch.minimum(maps.flatten(1).float(), threshold[:, None])
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / (span + eps).clamp_min(torch.finfo(flat.dtype).tiny), 0.0)
    return scaled.reshape(maps.shape)


def clip_and_rescale(maps: torch.Tensor, quantile: float = 0.99, eps: float = 0.0) -> torch.Tensor:
    """Clip each map at its `quantile`, then min-max scale it to [0, 1] (constant map -> 0)."""
    return rescale(maps, clip_threshold(maps, quantile), eps)
