"""Augmentation-only baselines (ens, ens_reliability, zero) against plain references, and
the TV aggregator over all views."""

import pytest
import torch
from conftest import CLASSNAMES, make_tiny_vit

from atpt_plugin import load_adapter
from atpt_plugin.aggregators import reliability_weights, total_variation_weights
from atpt_plugin.objectives import entropy

SMALL = dict(views=16, rho=0.25)


def zero_shot_views(tta, image):
    """The adapter's own views of one image and their zero-shot logits, computed plainly."""
    views = tta.make_views(image, tta.generator_for(image))
    with torch.no_grad():
        logits = tta.backbone.logit_scale * tta.backbone.encode_image(views) @ tta.zero_shot_text.t()
    return views, logits


@pytest.fixture
def image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def test_ens_is_the_uniform_average_of_all_views_with_one_pass_and_no_tuning(tokenizer, image, monkeypatch):
    tta = load_adapter("ens", **SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    _, logits = zero_shot_views(tta, image[0])
    expected = torch.log(torch.softmax(logits, dim=-1).mean(dim=0))

    encoded = []
    encode = tta.view_encoder
    monkeypatch.setattr(tta, "view_encoder", lambda views: encoded.append(len(views)) or encode(views))
    monkeypatch.setattr(tta, "tune", lambda *args, **kwargs: pytest.fail("ens must not tune"))
    torch.testing.assert_close(tta(image)[0], expected, rtol=1e-5, atol=1e-5)
    assert encoded == [SMALL["views"]], "one image pass per view, once"


def test_ens_reliability_weights_all_views_without_tuning(tokenizer, image):
    tta = load_adapter("ens_reliability", **SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    views, logits = zero_shot_views(tta, image[0])
    with torch.no_grad():
        weights = reliability_weights(tta.backbone.encode_image(views))
    torch.testing.assert_close(tta(image)[0], (weights[:, None] * logits).sum(0), rtol=1e-5, atol=1e-5)


def test_zero_is_a_majority_vote_of_the_confident_views(tokenizer):
    tta = load_adapter("zero", **SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    for image, output in zip(images, tta(images)):
        _, logits = zero_shot_views(tta, image)
        confident = logits[torch.argsort(entropy(logits), stable=True)[:4]]
        votes = torch.bincount(confident.argmax(-1), minlength=len(CLASSNAMES))
        winners = (votes == votes.max()).nonzero().flatten()
        mean_probability = torch.softmax(confident, -1).mean(0)
        assert output.argmax() == winners[mean_probability[winners].argmax()]
        # the log-scores are a loss for adaptive attacks: log((votes + mean probability) / their sum)
        score = votes + mean_probability
        torch.testing.assert_close(output, torch.log(score / score.sum()), rtol=1e-5, atol=1e-6)


def test_tv_aggregator_honours_mean_over_all(tokenizer, image):
    tta = load_adapter("atpt", **SMALL, steps=0, mean_over="all").wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    views, logits = zero_shot_views(tta, image[0])
    weights = total_variation_weights(tta.explain(views))
    expected = torch.log((weights[:, None] * torch.softmax(logits, -1)).sum(0))
    torch.testing.assert_close(tta(image)[0], expected, rtol=1e-5, atol=1e-5)
    confident_only = load_adapter("atpt", **SMALL, steps=0).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)(image)
    assert not torch.allclose(confident_only, tta(image))
