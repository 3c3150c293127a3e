"""The written-out AdamW equals torch.optim.AdamW, and its gradient paths reach the input."""

import pytest
import torch
from conftest import CLASSNAMES

from atpt_plugin import load_adapter
from atpt_plugin.tuning import adamw


def quadratic(target):
    return lambda p: ((p - target) ** 2 * torch.arange(1.0, 1 + p.numel()).reshape(p.shape)).sum()


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("path", ["none", "exact", "bpda"])
def test_matches_torch_adamw(steps, path):
    start, target = torch.randn(4, 3), torch.randn(4, 3)
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([reference], lr=0.05, weight_decay=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        quadratic(target)(reference).backward()
        optimizer.step()
    ours = adamw(start, quadratic(target), steps, lr=0.05, weight_decay=0.01, path=path)
    torch.testing.assert_close(ours.detach(), reference.detach(), rtol=1e-6, atol=1e-6)


def test_paths_differentiate_through_the_step():
    start = torch.randn(5)
    x = torch.randn(5, requires_grad=True)
    exact = adamw(start, quadratic(x), 1, lr=0.1, weight_decay=0.0, path="exact")
    (exact_grad,) = torch.autograd.grad(exact.sum(), [x])
    bpda = adamw(start, quadratic(x), 1, lr=0.1, weight_decay=0.0, path="bpda")
    (bpda_grad,) = torch.autograd.grad(bpda.sum(), [x])
    # Adam's first step is lr * g / (|g| + eps): its exact derivative is ~ eps / |g| ~ 0,
    # while the straight-through surrogate passes lr * dg/dx / mean|g|.
    assert exact_grad.abs().max() < 1e-5
    assert bpda_grad.abs().min() > 1e-3
    assert not adamw(start, quadratic(x), 1, lr=0.1, weight_decay=0.0).requires_grad


@pytest.mark.parametrize("steps", [1, 2])
def test_input_gradients_through_the_whole_pipeline(steps, tiny_vit, tokenizer, images):
    """fixed_prompt: the image path alone; bpda and exact add the tuning step's derivative.
    Exact's is ~0 after one step (Adam's first step is ~ -lr sign(g)), not after two."""
    grads = {}
    for path in ("fixed_prompt", "bpda", "exact"):
        adapter = load_adapter("atpt", views=8, rho=0.25, steps=steps, input_gradient=path)
        tta = adapter.wrap(tiny_vit, CLASSNAMES, tokenizer)
        x = images[:1].clone().requires_grad_(True)
        logits = tta(x)
        (grads[path],) = torch.autograd.grad(logits[0, 0] - logits[0, 1], [x])
        assert torch.isfinite(grads[path]).all()
        with torch.no_grad():
            torch.testing.assert_close(logits.detach(), tta(images[:1]), rtol=1e-5, atol=1e-5)
    scale = grads["fixed_prompt"].abs().max()
    assert scale > 0
    # measured: bpda moves the gradient by 1.2x (one step) and 22x (two) the image path's largest entry
    assert (grads["bpda"] - grads["fixed_prompt"]).abs().max() > 0.5 * scale
    exact_change = (grads["exact"] - grads["fixed_prompt"]).abs().max()
    if steps == 1:  # measured 5e-6 of the scale
        assert exact_change < 1e-4 * scale
    else:  # measured 1.7x the scale
        assert exact_change > 0.5 * scale


def test_bpda_and_fixed_prompt_gradients_differ(tiny_vit, tokenizer, images):
    grads = {}
    for path in ("fixed_prompt", "bpda"):
        tta = load_adapter("rtpt", views=8, input_gradient=path).wrap(tiny_vit, CLASSNAMES, tokenizer)
        x = images[:1].clone().requires_grad_(True)
        (grads[path],) = torch.autograd.grad(tta(x)[0, 0], [x])
    assert not torch.allclose(grads["fixed_prompt"], grads["bpda"])


def test_mta_output_is_differentiable(tiny_vit, tokenizer, images):
    tta = load_adapter("mta", views=8).wrap(tiny_vit, CLASSNAMES, tokenizer)
    x = images[:1].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(tta(x)[0, 0], [x])
    assert grad.abs().sum() > 0
