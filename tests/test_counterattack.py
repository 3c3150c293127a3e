"""TTC as an input defence: the counterattack against a plain reference, its budget and box,
zero budget = zero-shot, composition with A-TPT, and adaptive attacks through it."""

import math

import pytest
import torch
from conftest import CLASSNAMES, make_tiny_resnet, make_tiny_vit

from atpt_plugin import AdapterConfig, load_adapter
from atpt_plugin.api import load_adapter_spec
from atpt_plugin.input_defences import INPUT_DEFENCES, counterattack_weights
from atpt_plugin.input_defences import TestTimeCounterattack as Counterattack  # not a test class
from atpt_plugin.registry import UnknownNameError

SMALL = dict(views=8, rho=0.25)


class LinearBackbone:
    """f(x) = W vec(x) + b: a model whose counterattack gradient is known in closed form."""

    image_size = 4

    def __init__(self, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(5, 3 * 4 * 4, generator=generator, dtype=torch.float64)
        self.bias = torch.randn(5, generator=generator, dtype=torch.float64)

    def embed_image(self, images):
        return images.flatten(1).double() @ self.weight.t() + self.bias


def reference_counterattack(backbone, image, seed, eps, steps, alpha, tau_threshold, beta):
    """TTC for one image, written out: the gradient of ||W d||^2 is 2 W^T W d."""
    x = image.double()
    noise = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed)).double()
    low, high = -x, 1 - x
    deltas = [torch.minimum(torch.maximum(eps * (2 * noise - 1), low), high)]
    anchor = backbone.embed_image(x[None])[0]
    tau = (backbone.embed_image((x + deltas[0])[None])[0] - anchor).norm() / anchor.norm()
    if tau >= tau_threshold:
        return x + deltas[0], tau
    gram = backbone.weight.t() @ backbone.weight
    for _ in range(steps):
        gradient = (2 * gram @ deltas[-1].flatten()).view_as(x)
        step = (deltas[-1] + alpha * gradient.sign()).clamp(-eps, eps)
        deltas.append(torch.minimum(torch.maximum(step, low), high))
    total = sum(math.exp(beta * k) for k in range(steps + 1))
    return x + sum(math.exp(beta * k) / total * d for k, d in enumerate(deltas)), tau


def test_weights_are_the_softmax_of_beta_k():
    assert counterattack_weights(2, 2.0) == pytest.approx([0.015876, 0.117310, 0.866813], abs=1e-6)
    assert counterattack_weights(3, 0.0) == pytest.approx([0.25] * 4)
    assert sum(counterattack_weights(5, 1.3)) == pytest.approx(1.0)
    one_pixel = sum(w * d for w, d in zip(counterattack_weights(2, 2.0), (2 / 255, 3 / 255, 4 / 255)))
    assert one_pixel == pytest.approx(0.0151017, abs=1e-7) and 255 * one_pixel == pytest.approx(3.850937, abs=1e-6)


def test_counterattack_equals_the_plain_reference_on_both_branches():
    backbone = LinearBackbone()
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(6, 3, 4, 4, generator=generator, dtype=torch.float64)
    images[0] = 0.0  # the box bites: no pixel may go below 0
    images[1] = 1.0
    settings = dict(eps=16 / 255, steps=3, alpha=4 / 255, tau_threshold=0.05, beta=2.0)
    defence = Counterattack(**settings)
    out = defence(backbone, images, [torch.Generator().manual_seed(i) for i in range(6)])
    taus = []
    for i, image in enumerate(images):
        expected, tau = reference_counterattack(backbone, image, i, **settings)
        taus.append(float(tau))
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-12)
    assert min(taus) < 0.05 <= max(taus), f"the images must cover both branches, got tau {taus}"


def test_budget_and_box_hold_on_a_clip_model(tokenizer):
    model = make_tiny_vit()
    adapter = load_adapter("ttc", ttc_eps=8 / 255, ttc_steps=3).wrap(model, CLASSNAMES, tokenizer)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    images[0, :, :8] = 0.0
    images[1, :, :8] = 1.0
    defended = adapter.defend(images, track_input=False)
    assert defended.min() >= 0 and defended.max() <= 1
    assert (defended - images).abs().max() <= 8 / 255 + 1e-7
    assert not torch.equal(defended, images)


def test_random_start_depends_only_on_the_seed_and_the_image(tokenizer):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    adapter = load_adapter("ttc").wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    together = adapter.defend(images, track_input=False)
    alone = torch.cat([adapter.defend(images[i : i + 1], track_input=False) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-6)
    other_seed = load_adapter("ttc", seed=1).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    assert not torch.equal(other_seed.defend(images, track_input=False), together)


@pytest.mark.parametrize("make_model, size", [(make_tiny_vit, 32), (make_tiny_resnet, 64)])
def test_zero_budget_is_zeroshot_bit_for_bit(make_model, size, tokenizer):
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    zeroshot = load_adapter("zeroshot").wrap(make_model(), CLASSNAMES, tokenizer)(images)
    assert torch.equal(load_adapter("ttc", ttc_eps=0.0).wrap(make_model(), CLASSNAMES, tokenizer)(images), zeroshot)
    assert not torch.equal(load_adapter("ttc").wrap(make_model(), CLASSNAMES, tokenizer)(images), zeroshot)


def test_ttc_is_zeroshot_with_the_input_defence():
    assert load_adapter("ttc").config == load_adapter("zeroshot").config.replace(input_defence="ttc")
    config = AdapterConfig()
    assert (config.ttc_eps, config.ttc_steps, config.ttc_alpha) == (4 / 255, 2, 1 / 255)
    assert (config.ttc_tau_threshold, config.ttc_beta, config.input_defence) == (0.2, 2.0, None)


def test_composes_with_atpt(tokenizer, images):
    composed = load_adapter_spec("atpt[input_defence=ttc]")
    assert composed.name == "atpt[input_defence=ttc]" and composed.config.input_defence == "ttc"
    logits = composed.with_overrides(**SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)(images)
    plain = load_adapter("atpt", **SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)(images)
    assert logits.shape == plain.shape and torch.isfinite(logits).all() and not torch.equal(logits, plain)
    no_budget = composed.with_overrides(ttc_eps=0.0, **SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)(images)
    assert torch.equal(no_budget, plain)


def test_gradient_flows_through_x_and_the_combination(tokenizer):
    """Away from the box, d(x + delta_ttc)/dx is the identity: sign steps are constants."""
    adapter = load_adapter("ttc").wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
    images = (0.2 + 0.6 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    weights = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    with torch.enable_grad():
        defended = adapter.defend(images, track_input=True)
        (gradient,) = torch.autograd.grad((defended * weights).sum(), [images])
    torch.testing.assert_close(gradient, weights)


def test_an_adaptive_attack_gets_a_nonzero_gradient_through_the_defence(tokenizer):
    from atpt_plugin.adapters.adaptive import run_adaptive
    from atpt_plugin.adapters.attacks import AttackStats, make_attack

    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    spec = make_attack("eot-pgd", eps=4 / 255, steps=2, eot_iter=1, gradient="fixed_prompt")
    for name in ("ttc", "atpt[input_defence=ttc]"):
        adapter = load_adapter_spec(name).with_overrides(**SMALL).wrap(make_tiny_vit(), CLASSNAMES, tokenizer)
        x = images.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(adapter(x)[0, 1], [x])
        assert gradient.abs().sum() > 0, name
        # the label the adapter gives: an iterate that fools it stops the attack early (APGD's
        # convention), so the random start must leave it correct for a gradient step to run
        labels = adapter(images).argmax(-1)
        stats = AttackStats()
        adversarial = run_adaptive(spec, adapter, images, labels, seed=0, stats=stats)
        assert stats.backward >= 1 and stats.zero_gradients == 0, name
        assert (adversarial - images).abs().max() <= 4 / 255 + 1e-6 and not torch.equal(adversarial, images)


def test_registry_listing_and_bad_settings():
    from atpt_plugin.adapters.listing import registries

    assert registries()["input_defences"] is INPUT_DEFENCES and "ttc" in INPUT_DEFENCES.names()
    with pytest.raises(UnknownNameError, match="no input defence named 'tcc'.*did you mean 'ttc'"):
        AdapterConfig(input_defence="tcc")
    with pytest.raises(ValueError, match="ttc_eps is in \\[0,1\\] pixel units"):
        AdapterConfig(ttc_eps=4)
    with pytest.raises(ValueError, match="ttc_steps must be an integer >= 0"):
        AdapterConfig(ttc_steps=-1)
    assert AdapterConfig(input_defence="ttc").record()["input_defence"] == "ttc"
    assert AdapterConfig().record()["input_defence"] is None


def test_a_timm_classifier_takes_the_defence_too():
    from golden import tiny_timm_vit

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    plain = load_adapter("zeroshot").wrap(tiny_timm_vit())(images)
    assert torch.equal(load_adapter("ttc", ttc_eps=0.0).wrap(tiny_timm_vit())(images), plain)
    defended = load_adapter("ttc").wrap(tiny_timm_vit())(images)
    assert defended.shape == plain.shape and not torch.equal(defended, plain)
