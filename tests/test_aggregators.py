"""Objectives, confident selection and aggregators against plain references."""

import math

import torch

from atpt_plugin.aggregators import (
    MeanAggregator,
    ReliabilityAggregator,
    SingleViewAggregator,
    TotalVariationAggregator,
    ViewPredictions,
    reliability_weights,
    total_variation,
    total_variation_weights,
    weighted_log_mixture,
)
from atpt_plugin.objectives import OBJECTIVES, entropy, marginal_entropy, mean_entropy, select_confident


def plain_entropy(p):
    return -sum(float(x) * math.log(float(x)) for x in p if x > 0)


def test_entropies():
    logits = torch.randn(5, 7)
    probs = logits.softmax(-1)
    for i in range(5):
        assert abs(entropy(logits)[i].item() - plain_entropy(probs[i])) < 1e-5
    assert abs(mean_entropy(logits).item() - sum(plain_entropy(p) for p in probs) / 5) < 1e-5
    assert abs(marginal_entropy(logits).item() - plain_entropy(probs.mean(0))) < 1e-5
    batched = torch.randn(2, 5, 7)  # "along the last dimension", whatever comes before
    torch.testing.assert_close(entropy(batched), torch.stack([entropy(b) for b in batched]))
    for name, reference in (("mean_entropy", mean_entropy), ("marginal_entropy", marginal_entropy)):
        assert torch.equal(OBJECTIVES.get(name)()(logits), reference(logits))


def test_select_confident_takes_lowest_entropy_stably():
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 3.0], [5.0, 0.0]])
    assert select_confident(logits, 2).tolist() == [1, 3]
    assert select_confident(logits, 3).tolist() == [1, 3, 2]
    ties = torch.tensor([[1.0, 0.0, 2.0]]).repeat(100, 1)[torch.randperm(100)]  # 100 equal entropies
    assert select_confident(ties, 40).tolist() == list(range(40))


def test_total_variation_formula():
    maps = torch.rand(3, 5, 6)
    for k in range(3):
        m = maps[k]
        expected = sum(abs(float(m[u + 1, v] - m[u, v])) for u in range(4) for v in range(6))
        expected += sum(abs(float(m[u, v + 1] - m[u, v])) for u in range(5) for v in range(5))
        assert abs(total_variation(maps)[k].item() - expected) < 1e-4


def test_tv_weight_properties():
    smooth = torch.linspace(0, 1, 16).reshape(4, 4)
    noisy = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    weights = total_variation_weights(torch.stack([smooth, noisy, smooth]))
    assert weights[0] > weights[1], "lower TV, higher weight"
    torch.testing.assert_close(weights[0], weights[2])
    assert abs(weights.sum().item() - 1) < 1e-6
    tv = total_variation(torch.stack([smooth, noisy]))
    expected = torch.softmax(-tv / 3.0, 0)
    torch.testing.assert_close(total_variation_weights(torch.stack([smooth, noisy]), 3.0), expected)
    order = torch.tensor([2, 0, 1])
    maps = torch.stack([smooth, noisy, noisy.t()])
    torch.testing.assert_close(total_variation_weights(maps)[order], total_variation_weights(maps[order]))


def test_reliability_weights_against_loops():
    features = torch.nn.functional.normalize(torch.randn(8, 5), dim=-1)
    weights = reliability_weights(features, k=3, temperature=0.05)
    scores = []
    for i in range(8):
        others = sorted((float(features[i] @ features[j]) for j in range(8) if j != i), reverse=True)
        scores.append(sum(others[:3]) / 3)
    torch.testing.assert_close(weights, torch.softmax(torch.tensor(scores) / 0.05, 0))
    means = [sum(float(features[i] @ features[j]) for j in range(8) if j != i) / 7 for i in range(8)]
    expected = torch.softmax(torch.tensor(means) / 0.05, 0)  # k above K-1: the mean over all 7 others
    torch.testing.assert_close(reliability_weights(features, k=20, temperature=0.05), expected)
    assert torch.equal(reliability_weights(features, k=20), reliability_weights(features, k=7))


def test_reliability_ignores_self_similarity_exactly():
    """An isolated view must not score its own similarity of ~1 (kept by `sim >= 1` tests)."""
    cluster = torch.nn.functional.normalize(torch.randn(1, 16) + 0.05 * torch.randn(7, 16), dim=-1)
    isolated = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    weights = reliability_weights(torch.cat([isolated, cluster]), k=1, temperature=0.01)
    assert weights[0] < 1e-3


def views(logits, features=None, confident=None, maps=None):
    features = features if features is not None else torch.nn.functional.normalize(torch.randn(len(logits), 4), dim=-1)
    confident = confident if confident is not None else torch.arange(len(logits))
    return ViewPredictions(logits, features, confident, lambda idx: maps[idx])


def test_aggregators_against_references():
    logits = torch.randn(4, 3)
    maps = torch.rand(4, 3, 3)
    confident = torch.tensor([2, 0])
    v = views(logits, confident=confident, maps=maps)
    w = total_variation_weights(maps[confident])
    expected_tv = torch.log((w[:, None] * logits[confident].softmax(-1)).sum(0))
    torch.testing.assert_close(TotalVariationAggregator()(v), expected_tv)
    expected_mean = torch.log(logits[confident].softmax(-1).mean(0))
    torch.testing.assert_close(MeanAggregator("confident")(v), expected_mean)
    torch.testing.assert_close(MeanAggregator("all")(v), torch.log(logits.softmax(-1).mean(0)))
    rw = reliability_weights(v.features, 20, 0.01)
    torch.testing.assert_close(ReliabilityAggregator()(v), (rw[:, None] * logits).sum(0))
    assert torch.equal(SingleViewAggregator()(v), logits[0])


def test_weighted_log_mixture_is_a_distribution():
    out = weighted_log_mixture(torch.randn(5, 4) * 30, torch.full((5,), 0.2))
    torch.testing.assert_close(out.exp().sum(), torch.tensor(1.0))
