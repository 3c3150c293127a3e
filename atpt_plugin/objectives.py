"""Test-time objectives on view logits (and the prompt's text side), their registry, and the
confident-view selection.

An objective is any callable `(logits (n, C) of the selected views) -> scalar loss`,
differentiable w.r.t. the logits. An objective that also regularises the prompt's text side
(C-TPT, O-TPT) names what it reads as keyword parameters of its call, and the tuning loop
passes exactly those (`objective_call`, detected once from the signature):
- `text_features`: (C, E) L2-normalised class features of the prompt being tuned (the same
  features that made the logits, in the autograd graph of the prompt context);
- `logit_scale`: the model's scale s (logits = s * cos + bias).
So `def my_loss(logits)` keeps working, and `def my_loss(logits, text_features)` reads the text
side. A model without text (a timm classifier) refuses an objective that reads it.
Register one with `@OBJECTIVES.register("name")` or, from another package, under the
entry-point group `atpt_plugin.objectives`; or pass it as `objective=`.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Callable, Tuple

import torch
import torch.nn.functional as F

from .registry import Component, Registry

OBJECTIVES = Registry("objective", "atpt_plugin.objectives")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of softmax(logits) along the last dimension."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """A-TPT / R-TPT: (1/|B|) sum_i H(p(x_i))."""
    return entropy(logits).mean()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """TPT: H((1/|B|) sum_i p(x_i)), computed in log space."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(log_p.shape[0])
    return -(log_mean.exp() * log_mean).sum()


class Objective(Component, ABC):
    """Base of the registered objectives: `__call__(logits) -> scalar` (any callable also works)."""

    registry = OBJECTIVES

    @abstractmethod
    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...


@OBJECTIVES.register("mean_entropy")
class MeanEntropy(Objective):
    """A-TPT / R-TPT: the mean of the selected views' entropies."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return mean_entropy(logits)


@OBJECTIVES.register("marginal_entropy")
class MarginalEntropy(Objective):
    """TPT: the entropy of the selected views' average prediction."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return marginal_entropy(logits)


def text_dispersion(text_features: torch.Tensor) -> torch.Tensor:
    """C-TPT's ATFD: mean Euclidean distance of the L2-normalised class features to their
    (not re-normalised) centroid; features are normalised first, as the authors' code does."""
    features = F.normalize(text_features.float(), dim=-1)
    return (features - features.mean(dim=0)).norm(dim=-1).mean()


def orthogonality_penalty(text_features: torch.Tensor) -> torch.Tensor:
    """O-TPT's penalty in closed form: (1/C) sum_i | ||g_i|| - 1 | with g_i the rows of the cosine
    Gram matrix, i.e. the mean of sqrt(1 + sum_{j != i} cos^2(t_i, t_j)) - 1. Equal to the
    authors' Householder computation where that is defined, without its C x C x C tensors or its
    division by zero when a class is orthogonal to all others (docs/method.md)."""
    features = F.normalize(text_features.float(), dim=-1)
    gram = features @ features.t()
    return (gram.norm(dim=-1) - 1).abs().mean()


@OBJECTIVES.register("ctpt")
class DispersionRegularised(Objective):
    """C-TPT: TPT's marginal entropy minus weight * the text features' dispersion (ATFD)."""

    def __init__(self, weight: float = 50.0):
        self.weight = weight

    @classmethod
    def from_config(cls, config) -> "DispersionRegularised":
        return cls(config.dispersion_weight)

    def __call__(self, logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if self.weight == 0:  # TPT exactly: even a zero-weighted term reorders the text gradient's sums
            return marginal_entropy(logits)
        return marginal_entropy(logits) - self.weight * text_dispersion(text_features)


@OBJECTIVES.register("otpt")
class OrthogonalityRegularised(Objective):
    """O-TPT: TPT's marginal entropy plus weight * the text features' orthogonality penalty."""

    def __init__(self, weight: float = 18.0):
        self.weight = weight

    @classmethod
    def from_config(cls, config) -> "OrthogonalityRegularised":
        return cls(config.orthogonality_weight)

    def __call__(self, logits: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        if self.weight == 0:  # TPT exactly (see DispersionRegularised)
            return marginal_entropy(logits)
        return marginal_entropy(logits) + self.weight * orthogonality_penalty(text_features)


TEXT_INPUTS = ("text_features", "logit_scale")


def text_inputs(objective) -> Tuple[str, ...]:
    """The text-side inputs an objective's call names (none for `(logits) -> loss`)."""
    try:
        parameters = inspect.signature(objective).parameters
    except (TypeError, ValueError):  # a builtin without a signature reads logits only
        return ()
    return tuple(name for name in TEXT_INPUTS if name in parameters)


def objective_call(objective) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`(logits, text_features, logit_scale) -> loss` that passes the objective what it reads."""
    names = text_inputs(objective)
    if not names:
        return lambda logits, text_features, logit_scale: objective(logits)

    def call(logits, text_features, logit_scale):
        given = {"text_features": text_features, "logit_scale": logit_scale}
        return objective(logits, **{name: given[name] for name in names})

    return call


def select_confident(logits: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest-entropy views (stable: ties keep view order)."""
    return torch.argsort(entropy(logits), stable=True)[:count]
