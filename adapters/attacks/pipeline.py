"""Adaptive attacks: each wrapped adapter attacked as a whole, per image.

A test-time defence is only as robust as it is against an attacker who targets the
defence itself (Athalye et al., ICML 2018; Croce et al., ICML 2022):

- `eot-pgd`: L-inf PGD on the cross-entropy (or margin) of the adapter's output. Each step
  averages the input gradient over `eot_iter` adaptations with freshly drawn random views
  (Expectation over Transformation): the attacked copy of the adapter has `seed=None`, so
  it cannot exploit the deployed adapter's image-hash seeding, which only makes the view
  draw a discontinuous function of the pixels. Gradients flow through view construction
  (crops are differentiable resampling; AugMix's 8-bit ops are piecewise constant), the
  image features of all views and the aggregation; through the tuning step by `gradient`:
  "bpda" (straight-through through AdamW's sign-like first step), "exact" (create_graph;
  nearly zero, since Adam's first step is ~ -lr * sign(g)) or "fixed_prompt" (the tuned
  prompt held constant). Masks and confident selection are index operations: no gradient
  through the choice, gradient through the chosen views. Cost: steps * eot_iter
  adaptations, each with one backward pass, per image.
- `square`: torchattacks' Square attack (random search, no gradients) on the adapter as
  deployed: a gradient-free check that exposes gradient masking. Cost: up to n_queries
  adaptations per image (it stops on an image once it is misclassified).

The deployed adapter (its own configuration and seed) then predicts on the adversarial
image, as in the transfer setting. `adapters/adaptive.py` seeds and times the run and
holds the sanity checks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from atpt_plugin.config import INPUT_GRADIENTS
from atpt_plugin.episodic import evaluation_mode

from .base import ATTACKS, Attack, check_choice, check_counts


def attack_view(adapter: nn.Module, gradient: Optional[str] = None) -> nn.Module:
    """The adapter as the attacker runs it: the same model, prompt and components (shared,
    nothing copied but the configuration), with `input_gradient=gradient` and `seed=None`
    (new random views at every call: EOT). A module without an adapter configuration (e.g.
    a plain classifier) is returned as it is.
    """
    config = getattr(adapter, "config", None)
    if config is None or not hasattr(config, "replace"):
        return adapter
    overrides = {"seed": None}
    if gradient is not None:
        overrides["input_gradient"] = gradient
    view = copy.copy(adapter)  # shares _modules, _parameters, _buffers: the same weights and prompt
    object.__setattr__(view, "config", config.replace(**overrides))
    return view


@dataclass
class AttackStats:
    """Measured cost of one adaptive attack: adaptations (forward), input gradients
    (backward), images through the image tower (when counted by the caller), seconds."""

    forward: int = 0
    backward: int = 0
    image_passes: Optional[int] = None
    seconds: float = 0.0
    zero_gradients: int = 0  # backward passes whose input gradient was exactly zero (or absent)

    def as_dict(self) -> dict:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "image_passes": self.image_passes,
            "seconds": round(self.seconds, 6),
            "zero_gradients": self.zero_gradients,
        }


class _Counted(nn.Module):
    """Counts the images it forwards (each is one adaptation of the pipeline)."""

    def __init__(self, model: nn.Module, stats: AttackStats):
        super().__init__()
        self.model = model
        self.stats = stats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.stats.forward += int(images.shape[0])
        return self.model(images)


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Summed over the batch (each image is adapted on its own, so its gradient is its own)."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (others - true).sum()  # margin: > 0 once misclassified


def eot_pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    eot_iter: int = 1,
    random_start: bool = True,
    loss: str = "ce",
    norm: str = "Linf",
    stats: Optional[AttackStats] = None,
) -> torch.Tensor:
    """L-inf PGD whose every step uses the gradient summed over `eot_iter` forward passes.

    `model` is called `steps * eot_iter` times on the whole batch, each time with gradients
    w.r.t. its input; the last iterate is returned (as torchattacks' EOTPGD does). Random
    draws (the start, and the views of a `seed=None` adapter) come from the global RNG.
    An output that does not depend differentiably on the input gives a zero gradient
    (the image does not move); such passes are counted in `stats.zero_gradients`.
    """
    if norm != "Linf":
        raise ValueError("eot-pgd is an L-inf attack")
    stats = stats if stats is not None else AttackStats()
    images = images.detach()
    adversarial = images.clone()
    if random_start:
        adversarial = (adversarial + torch.empty_like(adversarial).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        grad = torch.zeros_like(adversarial)
        for _ in range(eot_iter):
            logits = model(adversarial)
            stats.forward += int(images.shape[0])
            objective = attack_loss(logits, labels, loss)
            g = None
            if objective.requires_grad:
                (g,) = torch.autograd.grad(objective, [adversarial], allow_unused=True)
            stats.backward += int(images.shape[0])
            if g is None:
                stats.zero_gradients += int(images.shape[0])
                continue
            stats.zero_gradients += int((g.flatten(1).abs().sum(1) == 0).sum())
            grad += g
        with torch.no_grad():
            adversarial = adversarial.detach() + alpha * grad.sign()
            adversarial = (images + (adversarial - images).clamp(-eps, eps)).clamp(0, 1)
    return adversarial.detach()


@ATTACKS.register("eot-pgd")
class EotPgd(Attack):
    """L-inf PGD on each adapter's whole pipeline, gradients averaged over eot_iter view draws per step.

    The gradient path through the tuning step is `gradient`: bpda, exact or fixed_prompt.
    """

    kind = "adaptive"
    defaults = {"steps": 20, "alpha": None, "eot_iter": 4, "gradient": "bpda", "loss": "ce", "random_start": True}
    aliases = ("adaptive-pgd",)
    budget_checks = {"fewer_steps": "steps", "fewer_eot": "eot_iter"}

    def validate(self, params):
        check_counts(params, "eot_iter")
        check_choice(params, "gradient", INPUT_GRADIENTS)
        check_choice(params, "loss", ("ce", "margin"))
        return {**params, "random_start": bool(params["random_start"])}

    def cost(self, spec) -> Dict[str, object]:
        n = spec.param_dict["steps"] * spec.param_dict["eot_iter"]
        return {"forward": n, "backward": n, "unit": "adaptation", "shared": False}

    def run(self, spec, adapter, images, labels, seed, stats):
        p = spec.param_dict
        model = attack_view(adapter, gradient=p["gradient"])
        return eot_pgd(
            model,
            images,
            labels,
            spec.eps,
            p["alpha"],
            p["steps"],
            p["eot_iter"],
            p["random_start"],
            p["loss"],
            spec.norm,
            stats,
        )


@ATTACKS.register("square")
class Square(Attack):
    """gradient-free Square (torchattacks' random search) on each adapter as deployed: exposes gradient masking"""

    kind = "adaptive"
    defaults = {"n_queries": 1000, "p_init": 0.8, "loss": "margin", "norm": "Linf"}
    aliases = ("square-attack",)
    budget_checks = {"fewer_queries": "n_queries"}

    def norm_of(self, params) -> Optional[str]:
        check_choice(params, "norm", ("Linf", "L2"))
        return params["norm"]

    def validate(self, params):
        check_counts(params, "n_queries")
        check_choice(params, "loss", ("ce", "margin"))
        p_init = float(params["p_init"])
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {params['p_init']!r}")
        return {**params, "p_init": p_init}

    def cost(self, spec) -> Dict[str, object]:
        return {"forward": spec.param_dict["n_queries"], "backward": 0, "unit": "adaptation (at most)", "shared": False}

    def run(self, spec, adapter, images, labels, seed, stats):
        import torchattacks

        p = spec.param_dict
        counted = _Counted(adapter, stats)
        attack = torchattacks.Square(
            counted,
            norm=spec.norm,
            eps=spec.eps,
            n_queries=p["n_queries"],
            n_restarts=1,
            p_init=p["p_init"],
            loss=p["loss"],
            seed=seed % (2**31),
        )
        attack.set_device(images.device)
        # torchattacks puts a model it finds in training mode back into training mode
        # afterwards, recursively: keep every submodule's own flag instead.
        with torch.no_grad(), evaluation_mode(counted):
            return attack(images, labels)
