"""AdamW written out as a function of its inputs, so a tuning step can be differentiated.

Test-time defences are evaluated honestly only by attacks that see through the adaptation
(Croce et al., ICML 2022). `adamw` computes exactly what `torch.optim.AdamW` does (tested)
and keeps the autograd graph when asked, with three ways to differentiate the update:
- "exact": the true derivative (Adam's first step is ~ -lr * sign(g): almost zero);
- "bpda": straight-through, the update's backward is that of -lr * g / mean|g|
  (Athalye et al. 2018), with the exact update in the forward pass;
- no graph at all when the caller does not differentiate (the defence's own use).
"""

from __future__ import annotations

from typing import Callable

import torch


def adamw(
    parameter: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.999),
    eps: float = 1e-8,
    path: str = "none",
    batched: bool = False,
) -> torch.Tensor:
    """`steps` AdamW steps from a fresh state; returns the final parameter.

    path "none": a detached result; "exact" / "bpda": the result stays in the graph of
    whatever `loss_fn` depends on besides the parameter (e.g. the input image).
    batched: the leading dimension indexes independent problems (one per image), so
    BPDA's step scale is taken per problem (AdamW itself is elementwise).
    """
    differentiable = path in ("exact", "bpda")
    beta1, beta2 = betas
    current = parameter.detach().clone().requires_grad_(True)
    first = torch.zeros_like(current)
    second = torch.zeros_like(current)
    for step in range(1, steps + 1):
        (grad,) = torch.autograd.grad(loss_fn(current), [current], create_graph=differentiable)
        first = beta1 * first + (1 - beta1) * grad
        second = beta2 * second + (1 - beta2) * grad * grad
        direction = (first / (1 - beta1**step)) / ((second / (1 - beta2**step)).sqrt() + eps)
        if path == "bpda":
            size = grad.detach().abs()
            scale = size.flatten(1).mean(1).view(-1, *[1] * (grad.dim() - 1)) if batched else size.mean()
            surrogate = grad / scale.clamp_min(eps)
            direction = surrogate + (direction - surrogate).detach()
        current = current * (1 - lr * weight_decay) - lr * direction
        if not differentiable:
            current = current.detach().requires_grad_(True)
    return current if differentiable else current.detach()
