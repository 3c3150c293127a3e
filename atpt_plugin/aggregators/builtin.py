"""The built-in aggregators: TV (A-TPT), reliability (R-TPT), mean, single view, MTA.

Those that average probabilities return the log of the weighted mixture (softmax of it
gives the mixture back, its argmax is the prediction).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..mta import mta_mode
from .base import AGGREGATORS, Aggregator, ViewPredictions


def weighted_log_mixture(logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log(sum_i w_i softmax(z_i)) without leaving log space."""
    return torch.logsumexp(torch.log_softmax(logits.float(), dim=-1) + torch.log(weights)[:, None], dim=0)


def total_variation(maps: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV per map (N,H,W): sum |vertical differences| + sum |horizontal differences|."""
    vertical = (maps[:, 1:, :] - maps[:, :-1, :]).abs().flatten(1).sum(1)
    horizontal = (maps[:, :, 1:] - maps[:, :, :-1]).abs().flatten(1).sum(1)
    return vertical + horizontal


def total_variation_weights(
    maps: torch.Tensor, temperature: float = 1.0, map_size: Optional[int] = None
) -> torch.Tensor:
    """softmax(-TV / temperature) over views: smoother (less noisy) maps weigh more.

    TV is taken on the patch-grid maps as the explainer returns them (min-max scaled to
    [0,1]); `map_size` upsamples first, which multiplies TV roughly by the upsampling factor.
    """
    if map_size is not None:
        maps = F.interpolate(
            maps.unsqueeze(1), size=(map_size, map_size), mode="bilinear", align_corners=False
        ).squeeze(1)
    return torch.softmax(-total_variation(maps.float()) / temperature, dim=0)


def reliability_weights(features: torch.Tensor, k: int = 20, temperature: float = 0.01) -> torch.Tensor:
    """R-TPT: softmax(mean of each view's top-k cosine similarities to the other views / T).

    Self-similarity is dropped by index: fp32 diagonals land within 5e-7 of 1, so a test
    such as `sim >= 1` keeps some of them by accident (docs/method.md §9.8).
    """
    count = features.shape[0]
    if count == 1:
        return torch.ones(1, device=features.device)
    similarity = features.float() @ features.float().t()
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=features.device)
    others = similarity[off_diagonal].reshape(count, count - 1)
    scores = torch.topk(others, min(k, count - 1), dim=1).values.mean(dim=1)
    return torch.softmax(scores / temperature, dim=0)


@AGGREGATORS.register("tv")
class TotalVariationAggregator(Aggregator):
    """A-TPT (paper): TV-weighted mixture of the confident (or all) views' probabilities."""

    needs_view_maps = True

    def __init__(self, temperature: float = 1.0, map_size: Optional[int] = None, over: str = "confident"):
        self.temperature = temperature
        self.map_size = map_size
        self.over = over

    @classmethod
    def from_config(cls, config) -> "TotalVariationAggregator":
        return cls(config.tv_temperature, config.tv_map_size, config.mean_over)

    def views_read(self, confident: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        return confident if self.over == "confident" else None

    def __call__(self, views: ViewPredictions) -> torch.Tensor:
        chosen = (
            views.confident
            if self.over == "confident"
            else torch.arange(len(views.logits), device=views.confident.device)
        )
        maps = views.view_maps(chosen)
        weights = total_variation_weights(maps, self.temperature, self.map_size)
        return weighted_log_mixture(views.logits[chosen], weights.to(views.logits.device))


@AGGREGATORS.register("reliability")
class ReliabilityAggregator(Aggregator):
    """R-TPT and the authors' A-TPT code: reliability-weighted sum of all views' logits."""

    def __init__(self, k: int = 20, temperature: float = 0.01):
        self.k = k
        self.temperature = temperature

    @classmethod
    def from_config(cls, config) -> "ReliabilityAggregator":
        return cls(config.reliability_k, config.reliability_temperature)

    def __call__(self, views: ViewPredictions) -> torch.Tensor:
        weights = reliability_weights(views.features, self.k, self.temperature)
        return (weights[:, None] * views.logits.float()).sum(dim=0)


@AGGREGATORS.register("mean")
class MeanAggregator(Aggregator):
    """Uniform probability average over the confident set (ablation) or all views (TPT-Ens)."""

    def __init__(self, over: str = "confident"):
        self.over = over

    @classmethod
    def from_config(cls, config) -> "MeanAggregator":
        return cls(config.mean_over)

    def views_read(self, confident: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        return confident if self.over == "confident" else None

    def __call__(self, views: ViewPredictions) -> torch.Tensor:
        logits = views.logits[views.confident] if self.over == "confident" else views.logits
        uniform = torch.full((logits.shape[0],), 1.0 / logits.shape[0], device=logits.device)
        return weighted_log_mixture(logits, uniform)


@AGGREGATORS.register("vote")
class ConfidentVoteAggregator(Aggregator):
    """ZERO: the confident views vote with their argmax (zero temperature).

    Ties go to the class with the higher mean probability over those views."""

    def views_read(self, confident: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        return confident

    def __call__(self, views: ViewPredictions) -> torch.Tensor:
        logits = views.logits[views.confident].float()
        votes = F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).sum(dim=0).to(logits.dtype)
        # mean probabilities lie in [0, 1) and sum to one: they only reorder classes with equal votes,
        # and they keep the output differentiable for adaptive attacks
        score = votes + torch.softmax(logits, dim=-1).mean(dim=0)
        return torch.log(score / score.sum())


@AGGREGATORS.register("single")
class SingleViewAggregator(Aggregator):
    """The prediction on view 0, the center crop (TPT, zero-shot CLIP)."""

    def views_read(self, confident: torch.Tensor, count: int) -> Optional[torch.Tensor]:
        return torch.zeros(1, dtype=torch.long, device=confident.device)

    def __call__(self, views: ViewPredictions) -> torch.Tensor:
        return views.logits[0]


@AGGREGATORS.register("mta")
class MTAAggregator(Aggregator):
    """MTA (training-free): score the inlierness-weighted MeanShift mode of the view features."""

    needs_text = "MTA scores its feature mode against class text features"

    def __call__(self, views: ViewPredictions) -> torch.Tensor:
        mode = mta_mode(views.features, torch.softmax(views.zero_shot_logits.float(), dim=-1))
        return views.logit_scale * mode.float() @ views.text_features.t() + views.logit_bias
