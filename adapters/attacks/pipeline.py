"""Adaptive attacks: each wrapped adapter attacked as a whole, per image.

A test-time defence is only as robust as it is against an attacker who targets the
defence itself (Athalye et al., ICML 2018; Croce et al., ICML 2022):

- `eot-pgd`: L-inf PGD on the cross-entropy (or margin) of the adapter's output. Each step
  averages the input gradient over `eot_iter` adaptations with freshly drawn random views
  (Expectation over Transformation): the attacked copy of the adapter draws fresh views at
  every call (from each image's own stream, `eot.py`), so it cannot exploit the deployed
  adapter's image-hash seeding, which only makes the view draw a discontinuous function
  of the pixels. Gradients flow through view construction
  (crops are differentiable resampling; AugMix's 8-bit ops are piecewise constant), the
  image features of all views and the aggregation; through the tuning step by `gradient`:
  "bpda" (straight-through through AdamW's sign-like first step), "exact" (create_graph;
  nearly zero, since Adam's first step is ~ -lr * sign(g)) or "fixed_prompt" (the tuned
  prompt held constant). Masks and confident selection are index operations: no gradient
  through the choice, gradient through the chosen views. Every iterate is checked against
  the deployed adapter and a sample stops at the first that fools it. Cost: at most
  steps * eot_iter adaptations with a backward pass and steps + 1 checks, per image.
- `apgd-eot` (`apgd.py`): torchattacks' APGD-CE / APGD-DLR with EOT on the same view of
  the adapter, AutoAttack's version for randomized defences.
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

    def add(self, other: "AttackStats") -> None:
        self.forward += other.forward
        self.backward += other.backward
        self.seconds += other.seconds
        self.zero_gradients += other.zero_gradients
        if other.image_passes is not None:
            self.image_passes = (self.image_passes or 0) + other.image_passes

    def as_dict(self) -> dict:
        return {
            "forward": self.forward,
            "backward": self.backward,
            "image_passes": self.image_passes,
            "seconds": round(self.seconds, 6),
            "zero_gradients": self.zero_gradients,
        }


class Counted(nn.Module):
    """Counts the images it forwards (each is one adaptation of the pipeline), and as
    backward passes those forwarded with gradients w.r.t. the input (the attacks here
    differentiate every such pass)."""

    def __init__(self, model: nn.Module, stats: AttackStats):
        super().__init__()
        self.model = model
        self.stats = stats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.stats.forward += int(images.shape[0])
        if torch.is_grad_enabled() and images.requires_grad:
            self.stats.backward += int(images.shape[0])
        return self.model(images)


def attack_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """Summed over the batch (each image is adapted on its own, so its gradient is its own)."""
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="sum")
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(1)
    return (others - true).sum()  # margin: > 0 once misclassified


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
        counted = Counted(adapter, stats)
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
