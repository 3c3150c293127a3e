"""Baselines and ablations: each differs from its neighbours exactly where it should."""

import pytest
import torch
from conftest import CLASSNAMES, make_tiny_resnet, make_tiny_vit
from golden import PRESETS

from atpt_plugin import list_adapters, load_adapter
from atpt_plugin.mta import mta_mode
from atpt_plugin.presets import ABLATIONS

SMALL = dict(views=8, rho=0.25)


def wrap(name, model, tokenizer, **overrides):
    return load_adapter(name, **{**SMALL, **overrides}).wrap(model, classnames=CLASSNAMES, tokenizer=tokenizer)


def test_every_preset_is_listed_with_a_description():
    listed = list_adapters()
    for name in PRESETS:
        assert name in listed and len(listed[name]) > 20


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs_on_a_vit(name, tokenizer, images):
    logits = wrap(name, make_tiny_vit(), tokenizer)(images)
    assert logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "atpt_grad_rollout"])
def test_every_preset_runs_on_a_resnet(name, tokenizer):
    logits = wrap(name, make_tiny_resnet(), tokenizer)(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, len(CLASSNAMES)) and torch.isfinite(logits).all()


def test_gradient_rollout_needs_a_vit(tokenizer):
    with pytest.raises(ValueError, match="needs a vit image tower"):
        wrap("atpt_grad_rollout", make_tiny_resnet(), tokenizer)


def test_zeroshot_is_plain_clip(tiny_vit, tokenizer, images):
    with torch.no_grad():
        text = tiny_vit.encode_text(tokenizer([f"a photo of a {c}." for c in CLASSNAMES]), normalize=True)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
        image = tiny_vit.encode_image((images - mean) / std, normalize=True)
        expected = tiny_vit.logit_scale.exp() * image @ text.t()
    torch.testing.assert_close(wrap("zeroshot", tiny_vit, tokenizer)(images), expected, rtol=1e-5, atol=1e-5)


def test_tpt_and_tpt_ens_share_the_prompt_not_the_prediction(tiny_vit, tokenizer, images):
    tpt, ens = wrap("tpt", tiny_vit, tokenizer), wrap("tpt_ens", tiny_vit, tokenizer)
    image = images[0]
    views = tpt.make_views(image, tpt.generator_for(image))
    assert torch.equal(views, ens.make_views(image, ens.generator_for(image)))
    features = tpt.backbone.encode_image(views)
    text = tpt.tune(features)
    assert torch.equal(text, ens.tune(features))
    logits = tpt.backbone.logit_scale * features @ text.t()
    torch.testing.assert_close(tpt(images[:1])[0], logits[0])
    torch.testing.assert_close(ens(images[:1])[0], torch.log(logits.softmax(-1).mean(0)))


def test_tpt_uses_marginal_entropy_rtpt_reliability(tokenizer):
    assert load_adapter("tpt").config.objective == "marginal_entropy"
    rtpt = load_adapter("rtpt").config
    assert (rtpt.objective, rtpt.aggregator, rtpt.reliability_k, rtpt.reliability_temperature) == (
        "mean_entropy",
        "reliability",
        20,
        0.01,
    )


def test_mta_scores_the_mode_of_the_zero_shot_views(tiny_vit, tokenizer, images):
    tta = wrap("mta", tiny_vit, tokenizer)
    image = images[1]
    views = tta.make_views(image, tta.generator_for(image))
    features = tta.backbone.encode_image(views)
    scale = tta.backbone.logit_scale
    probs = (scale * features @ tta.zero_shot_text.t()).softmax(-1)
    expected = scale * mta_mode(features, probs) @ tta.zero_shot_text.t()
    torch.testing.assert_close(tta(images[1:2])[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_overrides_reproduce_each_named_ablation(ablation, tiny_vit, tokenizer, images):
    changes, _ = ABLATIONS[ablation]
    named = wrap(ablation, tiny_vit, tokenizer)(images)
    overridden = wrap("atpt", tiny_vit, tokenizer, **changes)(images)
    assert torch.equal(named, overridden)
    assert not torch.equal(named, wrap("atpt", tiny_vit, tokenizer)(images))


def test_official_differs_from_paper_only_in_the_listed_discrepancies():
    paper, official = load_adapter("atpt").config, load_adapter("atpt_official").config
    differing = {f for f in paper.__dataclass_fields__ if getattr(paper, f) != getattr(official, f)}
    assert differing == {
        "token_site",
        "layer_weights",
        "explainer_eps",
        "gradcam_sharpen",
        "base_crop",
        "crop_source",
        "input_quantization",
        "mask_rule",
        "aggregator",
    }
