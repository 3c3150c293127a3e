"""TTC: test-time counterattacks (Xing, Zhao and Sebe, CVPR 2025), as an input defence.

The image x in [0,1] pixel space (before the model's mean/std) gets its own L-inf
perturbation that pushes its raw (unnormalised, projected) embedding f away from f(x):
1. a random start delta_0 ~ U[-eps, eps] per pixel, boxed so that x + delta_0 is in [0,1];
2. tau = ||f(x + delta_0) - f(x)|| / ||f(x)||: an image whose embedding barely moves under
   random noise looks "falsely stable" (adversarial images are), tau < tau_threshold;
3. if so, `steps` signed ascent steps on ||f(x + delta) - f(x)||^2 of size alpha, each
   projected onto the eps ball and the [0,1] box, and the deltas (delta_0 included) are
   combined with weights softmax(beta * k); otherwise delta_0 alone is kept.
The adapter then predicts on x + delta. Settings: ttc_eps (4/255), ttc_steps (2), ttc_alpha
(1/255), ttc_tau_threshold (0.2), ttc_beta (2), as the authors' code (docs/method.md, "TTC").

Gradient for adaptive attacks: sign() has zero derivative, so each step's direction is a
constant of the input; the output stays differentiable w.r.t. x through x itself, the box
projections (which depend on x) and the weighted combination - the exact derivative almost
everywhere, like BPDA's straight-through for the deltas. The branch on tau is a selection.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from ..augmenters import center_view
from .base import INPUT_DEFENCES, InputDefence


def counterattack_weights(steps: int, beta: float) -> List[float]:
    """w_k = exp(beta k) / sum_j exp(beta j), k = 0..steps: later deltas weigh more."""
    return torch.softmax(beta * torch.arange(steps + 1, dtype=torch.float64), dim=0).tolist()


def pixel_box(delta: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """delta clipped to [-x, 1 - x], so that x + delta stays in [0,1] (differentiable in x)."""
    return torch.maximum(torch.minimum(delta, 1 - images), -images)


@INPUT_DEFENCES.register("ttc")
class TestTimeCounterattack(InputDefence):
    """TTC: counterattack the input within its own budget when its embedding looks falsely stable."""

    def __init__(
        self, eps: float = 4 / 255, steps: int = 2, alpha: float = 1 / 255, tau_threshold: float = 0.2, beta=2.0
    ):
        self.eps = eps
        self.steps = steps
        self.alpha = alpha
        self.tau_threshold = tau_threshold
        self.beta = beta

    @classmethod
    def from_config(cls, config) -> "TestTimeCounterattack":
        return cls(config.ttc_eps, config.ttc_steps, config.ttc_alpha, config.ttc_tau_threshold, config.ttc_beta)

    def __call__(self, backbone, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        size = backbone.image_size

        def embed(x):
            return backbone.embed_image(center_view(x, size)).float()

        anchor = images.detach()
        with torch.no_grad():
            reference = embed(anchor)
        noise = torch.stack([torch.rand(image.shape, generator=g) for image, g in zip(anchor.cpu(), generators)])
        start = pixel_box(self.eps * (2 * noise.to(images.device, images.dtype) - 1), images)
        deltas, delta, tau = [start], start, None
        for _ in range(self.steps):
            leaf = delta.detach().requires_grad_(True)
            embedding = embed(anchor + leaf)
            if tau is None:  # the first step's forward is f(x + delta_0)
                tau = (embedding.detach() - reference).norm(dim=-1) / reference.norm(dim=-1)
            (grad,) = torch.autograd.grad((embedding - reference).pow(2).sum(), [leaf])
            delta = pixel_box((delta + self.alpha * grad.sign()).clamp(-self.eps, self.eps), images)
            deltas.append(delta)
        if tau is None:
            return (images + start).clamp(0, 1)
        combined = sum(w * d for w, d in zip(counterattack_weights(self.steps, self.beta), deltas))
        falsely_stable = (tau < self.tau_threshold).view(-1, *([1] * (images.dim() - 1)))
        # a convex combination of boxed deltas stays in [0,1]; the clamp only absorbs rounding
        return (images + torch.where(falsely_stable, combined, start)).clamp(0, 1)
