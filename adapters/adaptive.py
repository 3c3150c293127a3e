"""Running adaptive attacks (`attacks/pipeline.py`) on adapters, and their sanity checks.

Sanity checks (Carlini et al. 2019, "On Evaluating Adversarial Robustness"; Croce et al.
2022), on the first `SanityChecks.n` images of the evaluation:
- more of an attack's budget (steps, EOT samples, queries: its `budget_checks`) must not
  leave more images correct than a cheaper run with a fraction of it and the same seed;
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

import contextlib
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .attacks import AttackSpec, AttackStats, chunk_seed, format_eps, make_attack

CHECKS = ("fewer_steps", "fewer_eot", "fewer_queries", "large_eps", "transfer")
CHECK_TEXT = {
    "fewer_steps": "accuracy does not rise with more attack steps ({full} vs {variant})",
    "fewer_eot": "accuracy does not rise with more EOT samples per step ({full} vs {variant})",
    "fewer_queries": "accuracy does not rise with more queries ({full} vs {variant})",
    "large_eps": "accuracy is near zero (at most {near_zero:.0%}) at eps={variant}",
    "transfer": "the adaptive attack is at least as strong as the transfer attack ({variant})",
}


def run_adaptive(
    spec: AttackSpec,
    adapter: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
    stats: Optional[AttackStats] = None,
) -> torch.Tensor:
    """Adversarial versions of `images` made on `adapter` itself (adaptive `spec`), on its device.

    All randomness (random start, EOT view draws, Square's search) is seeded with `seed`
    alone (image i of a batched attack with `chunk_seed(seed, i)`), so a sample is attacked
    alike in any process and on resume; the caller's RNG state is restored afterwards.
    """
    stats = stats if stats is not None else AttackStats()
    if spec.is_adaptive and spec.attack.batched:
        each = [AttackStats() for _ in range(len(images))]
        adversarial = run_adaptive_each(
            spec, adapter, images, labels, [chunk_seed(seed, i) for i in range(len(images))], each
        )
        for item in each:
            stats.add(item)
        return adversarial
    with _seeded(spec, adapter, images, seed) as device:
        start = time.perf_counter()
        adversarial = spec.attack.run(spec, adapter, images.detach().to(device), labels.to(device), seed, stats)
        stats.seconds += time.perf_counter() - start
    return adversarial.detach()


def run_adaptive_each(
    spec: AttackSpec,
    adapter: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    seeds: Sequence[int],
    stats: Sequence[AttackStats],
) -> torch.Tensor:
    """Each image attacked as it would be alone, with its own seed and stats: in one batch
    when the attack is `batched` (the batch's seconds shared evenly), else one at a time."""
    if not spec.attack.batched:
        return torch.cat(
            [
                run_adaptive(spec, adapter, images[i : i + 1], labels[i : i + 1], seeds[i], stats[i])
                for i in range(len(images))
            ]
        )
    with _seeded(spec, adapter, images, seeds[0]) as device:
        start = time.perf_counter()
        adversarial = spec.attack.run_each(
            spec, adapter, images.detach().to(device), labels.to(device), list(seeds), stats
        )
        seconds = (time.perf_counter() - start) / max(1, len(images))
    for item in stats:
        item.seconds += seconds
    return adversarial.detach()


@contextlib.contextmanager
def _seeded(spec: AttackSpec, adapter: nn.Module, images: torch.Tensor, seed: int):
    """The adapter's device, with gradients on and the global RNG seeded, restored afterwards."""
    if not spec.is_adaptive:
        raise ValueError(f"attack {spec.name!r} is not adaptive")
    device = _device_of(adapter, images)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        yield device


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
        return {
            "n": self.n,
            "fraction": self.fraction,
            "large_eps": self.large_eps,
            "near_zero": self.near_zero,
            "transfer_steps": self.transfer_steps,
        }


def check_attacks(
    spec: AttackSpec, sanity: SanityChecks, backbone_kind: str = "vit", image_size: Optional[int] = None
) -> Dict[str, AttackSpec]:
    """{check name: the attack it runs} for an adaptive `spec` ({} for other attacks)."""
    if not spec.is_adaptive or sanity.n == 0:
        return {}
    p = spec.param_dict
    out: Dict[str, AttackSpec] = {}

    def fewer(value: int) -> int:
        return max(1, int(value * sanity.fraction))

    for check, parameter in spec.attack.budget_checks.items():
        if p[parameter] > 1:
            out[check] = spec.replace(**{parameter: fewer(p[parameter])})
    large = sanity.large_eps
    if large is None:
        large = min(16 * spec.eps, 128 / 255) if spec.norm == "Linf" else 16 * spec.eps
    if large > spec.eps:
        scaled = {"alpha": p["alpha"] * large / spec.eps} if "alpha" in p else {}
        out["large_eps"] = spec.replace(eps=large, **scaled)
    out["transfer"] = make_attack(
        "pgd" if spec.norm == "Linf" else "pgdl2",
        eps=spec.eps,
        steps=sanity.transfer_steps,
        backbone_kind=backbone_kind,
        image_size=image_size,
    )
    return out


def _variant_text(name: str, variant: AttackSpec, spec: AttackSpec) -> Tuple[str, str]:
    """(the variant, the full attack) in words, for the check's expectation."""
    p, q = variant.param_dict, spec.param_dict
    key = spec.attack.budget_checks.get(name)
    if key is not None:
        return f"{key}={p[key]}", f"{key}={q[key]}"
    if name == "large_eps":
        return format_eps(variant.eps, variant.norm), ""
    return f"{variant.name} on zero-shot CLIP, eps={format_eps(variant.eps, variant.norm)}, {p.get('steps')} steps", ""


def zero_gradient_warning(spec: AttackSpec, zero: int, backward: int, adapter: str = "") -> Optional[str]:
    """A warning when some of the attack's input gradients were exactly zero."""
    if not zero:
        return None
    return (
        f"{adapter + ': ' if adapter else ''}{zero} of {backward} input gradients of {spec.name} were exactly "
        "zero (the output has no differentiable path to the image, or its gradients are masked): the "
        "attack could not move there and its number is not a robustness claim; check with --attack square."
    )


def judge(
    spec: AttackSpec,
    variants: Dict[str, AttackSpec],
    sanity: SanityChecks,
    n: int,
    adv_correct: int,
    variant_correct: Dict[str, int],
    adapter: str = "",
) -> Tuple[List[dict], List[str]]:
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
                variant if name != "transfer" else "the transfer attack"
            )
        text = CHECK_TEXT[name].format(variant=variant, full=full, near_zero=sanity.near_zero)
        checks.append(
            {
                "check": name,
                "n": n,
                "adv_correct": adv_correct,
                "variant_correct": correct,
                "variant": variants[name].to_dict(),
                "passed": bool(passed),
                "expect": text,
                "measured": measured,
            }
        )
        if not passed:
            warnings.append(
                f"{adapter + ': ' if adapter else ''}sanity check '{name}' failed: expected {text}; "
                f"measured {measured}. The {spec.name} result may overstate robustness (the "
                "attack may not work on this adapter)."
            )
    return checks, warnings
