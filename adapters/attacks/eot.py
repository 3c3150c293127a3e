"""EOT-PGD on a whole test-time defence, batched, each image on its own random streams,
keeping the first iterate that fools the defence as deployed.

Two conventions make the attack honest and cheap (Croce et al., ICML 2020 and 2022):
- early stop: every iterate (the random start included) is checked against the deployed
  adapter, whose prediction depends only on its seed and the image; a sample stops at the
  first iterate the deployed adapter misclassifies and that iterate is returned. More
  steps can therefore never report a sample robust that fewer steps fooled, and a fooled
  sample costs no further adaptations;
- per-image randomness: each image has its own generator (seeded by its own seed) for its
  random start and for the views the attacker's copy draws at every call, so an image is
  attacked alike alone or in any batch, and batches only share the passes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from atpt_plugin.config import INPUT_GRADIENTS

from .base import ATTACKS, Attack, check_choice, check_counts
from .pipeline import AttackStats, attack_loss, attack_view


class ViewStreams:
    """Per-image randomness for the attacker's copy of an adapter: while `images` names the
    streams of the images of the next call, in order, the copy draws image i's randomness from
    stream i (`EpisodicAdapter.generator_for` asks once per image, in batch order, for each
    random stage: an input defence's, then the views')."""

    def __init__(self, view: nn.Module, generators: Sequence[torch.Generator]):
        self.generators = list(generators)
        self.order: List[torch.Generator] = []
        self.asked = 0
        if hasattr(view, "generator_for"):
            object.__setattr__(view, "generator_for", self.next_generator)

    def set_images(self, indices: Sequence[int]) -> None:
        self.order = [self.generators[i] for i in indices]
        self.asked = 0

    def next_generator(self, image: torch.Tensor) -> torch.Generator:
        if not self.order:
            raise RuntimeError("the attacked adapter drew randomness before the attack named its images")
        stream = self.order[self.asked % len(self.order)]
        self.asked += 1
        return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=stream)))


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
    seeds: Optional[Sequence[int]] = None,
    stats: Optional[Sequence[AttackStats]] = None,
    deployed: Optional[nn.Module] = None,
) -> torch.Tensor:
    """L-inf PGD whose every step uses the gradient summed over `eot_iter` forward passes.

    `model` (the attacker's view) is called on the images still attacked, `eot_iter` times
    per step with gradients w.r.t. its input. `seeds`: one per image (its random start and
    view draws); None draws them from the global RNG. `stats`: one per image. `deployed`:
    the defence as deployed; each iterate is checked against it and an image stops at its
    first misclassified iterate, which is returned (without it: the last iterate). An
    output that does not depend differentiably on the input gives a zero gradient (the
    image does not move); such passes are counted in `stats[i].zero_gradients`.
    """
    n = len(images)
    stats = list(stats) if stats is not None else [AttackStats() for _ in range(n)]
    if seeds is None:
        seeds = [int(torch.randint(2**62, (1,))) for _ in range(n)]
    if len(seeds) != n or len(stats) != n:
        raise ValueError(f"eot_pgd needs one seed and one stats per image: {n} images, {len(seeds)} seeds")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    streams = ViewStreams(model, generators)
    images = images.detach()
    adversarial = images.clone()
    if random_start:
        noise = [torch.empty(images.shape[1:]).uniform_(-eps, eps, generator=g) for g in generators]
        adversarial = (adversarial + torch.stack(noise).to(images)).clamp(0, 1)
    result = adversarial.clone()
    active = torch.arange(n, device=images.device)

    def keep_fooled(active: torch.Tensor) -> torch.Tensor:
        """Store the iterates the deployed adapter misclassifies; returns the images still robust."""
        if deployed is None or not len(active):
            return active
        with torch.no_grad():
            predictions = deployed(adversarial[active]).argmax(-1)
        for i in active.tolist():
            stats[i].forward += 1
        fooled = predictions != labels[active]
        result[active[fooled]] = adversarial[active[fooled]]
        return active[~fooled]

    active = keep_fooled(active)
    for _ in range(steps):
        if not len(active):
            break
        current = adversarial[active].detach().requires_grad_(True)
        grad = torch.zeros_like(current)
        for _ in range(eot_iter):
            streams.set_images(active.tolist())
            objective = attack_loss(model(current), labels[active], loss)
            g = None
            if objective.requires_grad:
                (g,) = torch.autograd.grad(objective, [current], allow_unused=True)
            zero = [True] * len(active) if g is None else (g.flatten(1).abs().sum(1) == 0).tolist()
            for i, is_zero in zip(active.tolist(), zero):
                stats[i].forward += 1
                stats[i].backward += 1
                stats[i].zero_gradients += int(is_zero)
            if g is not None:
                grad += g
        with torch.no_grad():
            moved = current.detach() + alpha * grad.sign()
            clean = images[active]
            adversarial[active] = (clean + (moved - clean).clamp(-eps, eps)).clamp(0, 1)
        active = keep_fooled(active)
    result[active] = adversarial[active]
    return result.detach()


@ATTACKS.register("eot-pgd")
class EotPgd(Attack):
    """L-inf PGD on each adapter's whole pipeline, gradients averaged over eot_iter view draws per step.

    The gradient path through the tuning step is `gradient`: bpda, exact or fixed_prompt.
    Each iterate is checked against the deployed adapter; a sample stops at the first that fools it.
    """

    kind = "adaptive"
    batched = True
    defaults = {"steps": 20, "alpha": None, "eot_iter": 4, "gradient": "bpda", "loss": "ce", "random_start": True}
    aliases = ("adaptive-pgd",)
    budget_checks = {"fewer_steps": "steps", "fewer_eot": "eot_iter"}

    def validate(self, params):
        check_counts(params, "eot_iter")
        check_choice(params, "gradient", INPUT_GRADIENTS)
        check_choice(params, "loss", ("ce", "margin"))
        return {**params, "random_start": bool(params["random_start"])}

    def cost(self, spec) -> Dict[str, object]:
        steps, draws = spec.param_dict["steps"], spec.param_dict["eot_iter"]
        return {
            "forward": steps * draws + steps + 1,
            "backward": steps * draws,
            "unit": "adaptation (at most)",
            "shared": False,
        }

    def run_each(self, spec, adapter, images, labels, seeds, stats):
        if spec.norm != "Linf":
            raise ValueError("eot-pgd is an L-inf attack")
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
            seeds,
            stats,
            deployed=adapter,
        )
