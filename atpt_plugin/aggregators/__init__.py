"""Aggregators: the views' tuned predictions -> one prediction per test image."""

from .base import AGGREGATORS, Aggregator, ViewPredictions
from .builtin import (
    ConfidentVoteAggregator,
    MeanAggregator,
    MTAAggregator,
    ReliabilityAggregator,
    SingleViewAggregator,
    TotalVariationAggregator,
    reliability_weights,
    total_variation,
    total_variation_weights,
    weighted_log_mixture,
)

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "ViewPredictions",
    "ConfidentVoteAggregator",
    "MeanAggregator",
    "MTAAggregator",
    "ReliabilityAggregator",
    "SingleViewAggregator",
    "TotalVariationAggregator",
    "reliability_weights",
    "total_variation",
    "total_variation_weights",
    "weighted_log_mixture",
]
