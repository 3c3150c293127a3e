"""Adaptive attacks: each wrapped adapter attacked as a whole, and the sanity checks that go with them.

The paper's protocol is a transfer attack (PGD on zero-shot CLIP, then adapt). A test-time
defence is only as robust as it is against an attacker who targets the defence itself
(Athalye et al., ICML 2018; Croce et al., ICML 2022), so these attacks run on the wrapped
adapter `tta`, per image:

- `eot-pgd`: L-inf PGD on the cross-entropy (or margin) of `tta`'s output. Each step
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
image, as in the transfer setting.

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Croce et al.
2022), on the first `SanityChecks.n` images of the evaluation:
- more steps (and more EOT samples, more queries) must not leave more images correct than
  a cheaper run of the same attack with the same seed (`fewer_steps`, `fewer_eot`,
  `fewer_queries`: a quarter of them);
- at a large budget (default 16 eps, at most 128/255) accuracy must be near zero
  (`large_eps`, at most `near_zero`);
- the adaptive attack must be at least as strong as the transfer attack of the paper
  (PGD on zero-shot CLIP with the same eps) on the same images (`transfer`).
A failed check becomes a warning in the results (results.md, summary.json): the attack is
probably not working on that adapter and its number is not a robustness claim. So does an
input gradient that is exactly zero (an output with no differentiable path to the image,
or masked gradients): EOT-PGD cannot move there, and Square is the check to run.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from atpt_plugin.episodic import evaluation_mode

from .attacks import AttackSpec, make_attack

CHECKS = ("fewer_steps", "fewer_eot", "fewer_queries", "large_eps", "transfer")
CHECK_TEXT = {
    "fewer_steps": "accuracy does not rise with more attack steps ({full} vs {variant})",
    "fewer_eot": "accuracy does not rise with more EOT samples per step ({full} vs {variant})",
    "fewer_queries": "accuracy does not rise with more queries ({full} vs {variant})",
    "large_eps": "accuracy is near zero (at most {near_zero:.0%}) at eps={variant}",
    "transfer": "the adaptive attack is at least as strong as the transfer attack ({variant})",
}


# ---- the attacked pipeline --------------------------------------------------------------
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
    view = copy.copy(adapter)   # shares _modules, _parameters, _buffers: the same weights and prompt
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
    zero_gradients: int = 0      # backward passes whose input gradient was exactly zero (or absent)

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "image_passes": self.image_passes,
                "seconds": round(self.seconds, 6), "zero_gradients": self.zero_gradients}


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
    return (others - true).sum()     # margin: > 0 once misclassified


def eot_pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, alpha: float, steps: int,
            eot_iter: int = 1, random_start: bool = True, loss: str = "ce", norm: str = "Linf",
            stats: Optional[AttackStats] = None) -> torch.Tensor:
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


def run_adaptive(spec: AttackSpec, adapter: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int,
                 stats: Optional[AttackStats] = None) -> torch.Tensor:
    """Adversarial versions of `images` made on `adapter` itself (adaptive `spec`), on its device.

    All randomness (random start, EOT view draws, Square's search) is seeded with `seed`
    alone, so a sample is attacked alike in any process and on resume; the caller's RNG
    state is restored afterwards.
    """
    if not spec.is_adaptive:
        raise ValueError(f"attack {spec.name!r} is not adaptive")
    stats = stats if stats is not None else AttackStats()
    p = spec.param_dict
    device = _device_of(adapter, images)
    images, labels = images.detach().to(device), labels.to(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        if spec.name == "eot-pgd":
            model = attack_view(adapter, gradient=p["gradient"])
            adversarial = eot_pgd(model, images, labels, spec.eps, p["alpha"], p["steps"], p["eot_iter"],
                                  p["random_start"], p["loss"], spec.norm, stats)
        elif spec.name == "square":
            import torchattacks
            counted = _Counted(adapter, stats)
            attack = torchattacks.Square(counted, norm=spec.norm, eps=spec.eps, n_queries=p["n_queries"],
                                         n_restarts=1, p_init=p["p_init"], loss=p["loss"], seed=seed % (2 ** 31))
            attack.set_device(device)
            # torchattacks puts a model it finds in training mode back into training mode
            # afterwards, recursively: keep every submodule's own flag instead.
            with torch.no_grad(), evaluation_mode(counted):
                adversarial = attack(images, labels)
        else:
            raise ValueError(f"no adaptive attack named {spec.name!r}")
    stats.seconds += time.perf_counter() - start
    return adversarial.detach()


def _device_of(adapter: nn.Module, images: torch.Tensor) -> torch.device:
    backbone = getattr(adapter, "backbone", None)
    if getattr(backbone, "device", None) is not None:
        return torch.device(backbone.device)
    parameter = next(adapter.parameters(), None)
    return parameter.device if parameter is not None else images.device


# ---- sanity checks ------------------------------------------------------------------------
@dataclass(frozen=True)
class SanityChecks:
    """Which images the checks run on and how they judge.

    n: the checks run on the first n images of the evaluation (0: no checks).
    fraction: the cheaper variants use this fraction of the steps / EOT samples / queries.
    large_eps: the "near zero" budget ([0,1] units); None: 16 eps (at most 128/255 for L-inf).
    near_zero: the largest accuracy at large_eps that passes.
    transfer_steps: steps of the transfer PGD compared against; None: the paper's (100 ViT, 1 ResNet).
    """

    n: int = 8
    fraction: float = 0.25
    large_eps: Optional[float] = None
    near_zero: float = 0.1
    transfer_steps: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"sanity checks: n must be an integer >= 0, got {self.n!r}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"sanity checks: fraction must be in (0, 1), got {self.fraction!r}")
        if not 0 <= self.near_zero < 1:
            raise ValueError(f"sanity checks: near_zero must be in [0, 1), got {self.near_zero!r}")

    def to_dict(self) -> dict:
        return {"n": self.n, "fraction": self.fraction, "large_eps": self.large_eps, "near_zero": self.near_zero,
                "transfer_steps": self.transfer_steps}


def check_attacks(spec: AttackSpec, sanity: SanityChecks, backbone_kind: str = "vit",
                  image_size: Optional[int] = None) -> Dict[str, AttackSpec]:
    """{check name: the attack it runs} for an adaptive `spec` ({} for other attacks)."""
    if not spec.is_adaptive or sanity.n == 0:
        return {}
    p = spec.param_dict
    out: Dict[str, AttackSpec] = {}

    def fewer(value: int) -> int:
        return max(1, int(value * sanity.fraction))

    if spec.name == "eot-pgd":
        if p["steps"] > 1:
            out["fewer_steps"] = spec.replace(steps=fewer(p["steps"]))
        if p["eot_iter"] > 1:
            out["fewer_eot"] = spec.replace(eot_iter=fewer(p["eot_iter"]))
    elif spec.name == "square" and p["n_queries"] > 1:
        out["fewer_queries"] = spec.replace(n_queries=fewer(p["n_queries"]))
    large = sanity.large_eps
    if large is None:
        large = min(16 * spec.eps, 128 / 255) if spec.norm == "Linf" else 16 * spec.eps
    if large > spec.eps:
        scaled = {"alpha": p["alpha"] * large / spec.eps} if "alpha" in p else {}
        out["large_eps"] = spec.replace(eps=large, **scaled)
    out["transfer"] = make_attack("pgd" if spec.norm == "Linf" else "pgdl2", eps=spec.eps,
                                  steps=sanity.transfer_steps, backbone_kind=backbone_kind, image_size=image_size)
    return out


def _variant_text(name: str, variant: AttackSpec, spec: AttackSpec) -> Tuple[str, str]:
    """(the variant, the full attack) in words, for the check's expectation."""
    from .attacks import format_eps
    p, q = variant.param_dict, spec.param_dict
    for check, key in (("fewer_steps", "steps"), ("fewer_eot", "eot_iter"), ("fewer_queries", "n_queries")):
        if name == check:
            return f"{key}={p[key]}", f"{key}={q[key]}"
    if name == "large_eps":
        return format_eps(variant.eps, variant.norm), ""
    return f"{variant.name} on zero-shot CLIP, eps={format_eps(variant.eps, variant.norm)}, {p.get('steps')} steps", ""


def zero_gradient_warning(spec: AttackSpec, zero: int, backward: int, adapter: str = "") -> Optional[str]:
    """A warning when some of the attack's input gradients were exactly zero."""
    if not zero:
        return None
    return (f"{adapter + ': ' if adapter else ''}{zero} of {backward} input gradients of {spec.name} were exactly "
            "zero (the output has no differentiable path to the image, or its gradients are masked): the "
            "attack could not move there and its number is not a robustness claim; check with --attack square.")


def judge(spec: AttackSpec, variants: Dict[str, AttackSpec], sanity: SanityChecks, n: int, adv_correct: int,
          variant_correct: Dict[str, int], adapter: str = "") -> Tuple[List[dict], List[str]]:
    """(checks, warnings) of one adapter from counts on the n checked images.

    adv_correct: images the deployed adapter still classifies correctly under the attack;
    variant_correct: the same under each check's attack.
    """
    checks, warnings = [], []
    if n == 0:
        return checks, warnings
    for name in CHECKS:
        if name not in variants or name not in variant_correct:
            continue
        correct = variant_correct[name]
        variant, full = _variant_text(name, variants[name], spec)
        if name == "large_eps":
            passed = correct <= sanity.near_zero * n
            measured = f"{correct}/{n} correct at eps={variant}"
        else:
            passed = adv_correct <= correct
            measured = f"{adv_correct}/{n} correct under {spec.name} vs {correct}/{n} under " + (
                variant if name != "transfer" else "the transfer attack")
        text = CHECK_TEXT[name].format(variant=variant, full=full, near_zero=sanity.near_zero)
        checks.append({"check": name, "n": n, "adv_correct": adv_correct, "variant_correct": correct,
                       "variant": variants[name].to_dict(), "passed": bool(passed), "expect": text,
                       "measured": measured})
        if not passed:
            warnings.append(f"{adapter + ': ' if adapter else ''}sanity check '{name}' failed: expected {text}; "
                            f"measured {measured}. The {spec.name} result may overstate robustness (the "
                            "attack may not work on this adapter).")
    return checks, warnings
