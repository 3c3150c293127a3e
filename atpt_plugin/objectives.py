"""Test-time objectives on view logits, their registry, and the confident-view selection.

An objective is any callable `(logits (n, C) of the selected views) -> scalar loss`,
differentiable w.r.t. the logits. Register one with `@OBJECTIVES.register("name")` or,
from another package, under the entry-point group `atpt_plugin.objectives`; or pass it as
`objective=`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

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


def select_confident(logits: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest-entropy views (stable: ties keep view order)."""
    return torch.argsort(entropy(logits), stable=True)[:count]
