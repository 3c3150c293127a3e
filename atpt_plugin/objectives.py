"""Test-time objectives on view logits and the confident-view selection."""
from __future__ import annotations

import math

import torch


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


OBJECTIVES = {"mean_entropy": mean_entropy, "marginal_entropy": marginal_entropy}


def select_confident(logits: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` lowest-entropy views (stable: ties keep view order)."""
    return torch.argsort(entropy(logits), stable=True)[:count]
