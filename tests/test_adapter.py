"""The episodic loop through the public wrap contract, on tiny random-init models."""

import copy

import pytest
import torch
from conftest import CLASSNAMES, make_tiny_resnet, make_tiny_vit

from atpt_plugin import adapter as adapter_module
from atpt_plugin import load_adapter
from atpt_plugin.objectives import mean_entropy, select_confident

SMALL = dict(views=8, rho=0.25)


def wrap(model, tokenizer, **overrides):
    return load_adapter("atpt", **{**SMALL, **overrides}).wrap(model, classnames=CLASSNAMES, tokenizer=tokenizer)


@pytest.mark.parametrize("make, size", [(make_tiny_vit, 32), (make_tiny_resnet, 64)])
def test_atpt_runs_on_both_towers(make, size, tokenizer):
    tta = wrap(make(), tokenizer)
    logits = tta(torch.rand(2, 3, size + 5, size + 9))
    assert logits.shape == (2, len(CLASSNAMES)) and torch.isfinite(logits).all()
    assert isinstance(tta, adapter_module.TestTimeAdapter) and isinstance(tta, torch.nn.Module)


def test_reset_leaves_no_trace_and_seed_reproduces(tiny_vit, tokenizer, images):
    tta = wrap(tiny_vit, tokenizer)
    first = tta(images)
    assert torch.equal(first, tta(images))
    assert torch.equal(first, wrap(tiny_vit, tokenizer)(images))
    assert not torch.equal(first, wrap(tiny_vit, tokenizer, seed=1)(images))


def test_model_is_left_exactly_as_it_was(tokenizer, images):
    model = make_tiny_vit()
    model.train()
    model.visual.transformer.resblocks[0].eval()
    for p in model.text.parameters() if hasattr(model, "text") else model.transformer.parameters():
        p.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    flags = [(m.training) for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    wrap(model, tokenizer)(images)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == [m.training for m in model.modules()]
    assert requires == [p.requires_grad for p in model.parameters()]
    assert hooks == [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


def test_works_under_no_grad_and_inference_mode(tiny_vit, tokenizer, images):
    tta = wrap(tiny_vit, tokenizer)
    expected = tta(images)
    with torch.no_grad():
        assert torch.equal(tta(images), expected)
    with torch.inference_mode():
        assert torch.equal(tta(images), expected)


def test_batch_order_and_batching_do_not_matter(tiny_vit, tokenizer):
    tta = wrap(tiny_vit, tokenizer)
    batch = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    together = tta(batch)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(tta(batch[order]), together[order], rtol=1e-5, atol=1e-5)
    alone = torch.cat([tta(batch[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-5)


def test_tuning_step_matches_a_written_out_adamw_step(tiny_vit, tokenizer, images):
    """One step: p <- p (1 - lr wd) - lr g / (|g| + eps), Adam's first step with bias correction."""
    tta = wrap(tiny_vit, tokenizer, aggregator="single", lr=0.01)
    image = images[0]
    views = tta.make_views(image, tta.generator_for(image))
    features = tta.backbone.encode_image(views).detach()
    scale = tta.backbone.logit_scale
    context = tta.prompt.initial_context.clone().requires_grad_(True)
    logits = scale * features @ tta.prompt.text_features(context).t()
    chosen = select_confident(logits.detach(), tta.config.n_confident)
    (grad,) = torch.autograd.grad(mean_entropy(logits[chosen]), [context])
    with torch.no_grad():
        tuned = context * (1 - 0.01 * 0.01) - 0.01 * grad / (grad.abs() + 1e-8)
        expected = scale * features[0] @ tta.prompt.text_features(tuned).t()
    # measured 4.8e-7 on logits up to 7 (fp32 rounding); weight decay alone moves them by 1.5e-4
    torch.testing.assert_close(tta(images[:1])[0], expected, rtol=0, atol=1e-5)
    zero_shot = scale * features[0] @ tta.zero_shot_text.t()
    assert not torch.allclose(expected, zero_shot), "the step must change the prediction"


def test_logits_are_differentiable_when_the_caller_asks(tiny_vit, tokenizer, images):
    tta = wrap(tiny_vit, tokenizer, views=1, steps=0, aggregator="single")
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tta(x).sum(), [x])
    assert grad.abs().sum() > 0
    assert not tta(images).requires_grad


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.rand(3, 32, 32), ValueError, "unsqueeze"),
        (torch.rand(1, 1, 3, 32, 32), ValueError, "shape"),
        (torch.rand(1, 4, 32, 32), ValueError, "1 or 3 channels"),
        (torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "/ 255"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN"),
        (torch.randn(1, 3, 32, 32), ValueError, "unnormalised"),
        ([[0.5]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_are_clear_errors(tiny_vit, tokenizer, bad, error, message):
    with pytest.raises(error, match=message):
        wrap(tiny_vit, tokenizer, views=2)(bad)


def test_grey_images_are_expanded(tiny_vit, tokenizer):
    tta = wrap(tiny_vit, tokenizer, views=2)
    grey = torch.rand(1, 1, 32, 32)
    assert torch.equal(tta(grey), tta(grey.expand(-1, 3, -1, -1)))


def test_wrap_errors(tiny_vit, tokenizer):
    with pytest.raises(TypeError, match="no backbone accepts Conv2d as a CLIP model.*open_clip"):
        load_adapter("atpt").wrap(torch.nn.Conv2d(3, 3, 3), classnames=CLASSNAMES, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        load_adapter("atpt").wrap(tiny_vit, classnames=CLASSNAMES)
    with pytest.raises(ValueError, match="duplicate"):
        load_adapter("atpt").wrap(tiny_vit, classnames=["cat", "cat"], tokenizer=tokenizer)


def test_empty_batch(tiny_vit, tokenizer):
    assert wrap(tiny_vit, tokenizer)(torch.rand(0, 3, 32, 32)).shape == (0, len(CLASSNAMES))


def test_bf16_autocast_runs_and_mostly_agrees(tiny_vit, tokenizer):
    batch = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    full = wrap(tiny_vit, tokenizer)(batch)
    half = wrap(tiny_vit, tokenizer, precision="bf16")(batch)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not torch.equal(full, half), "autocast must actually change the arithmetic"
    # measured 1.5e-3 (bf16 keeps 8 significant bits); a bf16 path that drifts further fails
    assert (full.softmax(-1) - half.softmax(-1)).abs().max() < 1e-2
