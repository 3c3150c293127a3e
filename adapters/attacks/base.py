"""Attacks by name: one class per attack, registered like every other component.

An `Attack` owns what is particular to it: its parameters and their defaults, their
validation, its norm, its cost per image, and either how it is built on the attacked
zero-shot model (kind "transfer", a torchattacks attack made once and shared by all
adapters) or how it runs on an adapter itself (kind "adaptive", per image, with the sanity
checks of `adapters/adaptive.py`). `make_attack` resolves a name and the common budget
parameters (eps, alpha, steps) into an `AttackSpec`, the plain record a run stores.
Another package adds an attack under the entry-point group `atpt_plugin.attacks`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from atpt_plugin.episodic import evaluation_mode
from atpt_plugin.registry import Registry

from .eps import check_eps, format_eps

ATTACKS = Registry("attack", "atpt_plugin.attacks")

PAPER_EPS = {"vit": 4 / 255, "resnet": 1 / 255}  # docs/method.md §6
PAPER_STEPS = {"vit": 100, "resnet": 1}
DEFAULT_L2_EPS = 0.5


class Attack:
    """Base class of the attacks. Subclasses set `kind`, `norm` and `defaults` and override
    what applies to them; the class docstring's first line is the attack's description.

    - `defaults`: every parameter besides eps with its default ("alpha" and "steps" get the
      common handling of `make_attack`: alpha = eps/4, the paper's steps for pgd);
    - `aliases`: other spellings users write (compared without case, "-" and "_");
    - `validate(params)`: per-attack checks and conversions of the resolved parameters;
    - `norm_of(params)`: the threat model's norm ("Linf", "L2"; None: no budget);
    - `cost(spec)`: forward / backward passes per image and their unit;
    - `build(model, spec, n_classes, seed)` (transfer) or `run(spec, adapter, images,
      labels, seed, stats)` (adaptive);
    - `run_each(spec, adapter, images, labels, seeds, stats)` (adaptive, `batched`): each
      image with its own seed and stats, its result independent of the others in the batch;
    - `budget_checks`: {sanity check: parameter} the adaptive sanity checks lower to a
      fraction ("fewer_steps": "steps"): more of it must not leave more images correct.
    """

    kind: str = "transfer"  # "transfer" (zero-shot CLIP, shared), "adaptive" (per adapter) or "none"
    norm: Optional[str] = "Linf"
    defaults: Dict[str, object] = {}
    aliases: Tuple[str, ...] = ()
    budget_checks: Dict[str, str] = {}
    batched: bool = False  # adaptive: `run_each` attacks many images at once, each as it would be alone
    unbounded_threat: str = "none"  # the threat model's name when there is no norm budget

    def norm_of(self, params: Dict[str, object]) -> Optional[str]:
        return self.norm

    def validate(self, params: Dict[str, object]) -> Dict[str, object]:
        return params

    def cost(self, spec: "AttackSpec") -> Dict[str, object]:
        steps = spec.param_dict.get("steps", 1)
        return {"forward": steps, "backward": steps, "unit": "zero-shot center view", "shared": True}

    def build(self, model: nn.Module, spec: "AttackSpec", n_classes: int, seed: int):
        raise ValueError(
            f"attack {spec.name!r} is {self.kind}: it builds no transfer attack"
            + (" (adaptive attacks run per adapter: adaptive.run_adaptive)" if self.kind == "adaptive" else "")
        )

    def run(
        self, spec: "AttackSpec", adapter: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int, stats
    ) -> torch.Tensor:
        raise ValueError(f"attack {spec.name!r} is {self.kind}, not adaptive")

    def run_each(self, spec: "AttackSpec", adapter: nn.Module, images, labels, seeds, stats) -> torch.Tensor:
        raise ValueError(f"attack {spec.name!r} does not attack images in batches")


def attack_named(name: str) -> Attack:
    return ATTACKS.get(name)()


def _plain(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def resolve_attack_name(name: str) -> str:
    """The registered name of an attack as users write it (case, "-", "_" and aliases ignored)."""
    wanted = _plain(name)
    for registered, entry in ATTACKS.entries().items():
        spellings = {_plain(registered), *map(_plain, getattr(entry.load(), "aliases", ()))}
        if wanted in spellings:
            return registered
    raise ATTACKS.unknown(name)


@dataclass(frozen=True)
class AttackSpec:
    """A named attack with every parameter resolved; `eps`/`alpha` in [0,1] pixel units."""

    name: str
    norm: Optional[str]
    eps: Optional[float]
    params: Tuple[Tuple[str, object], ...] = ()

    @property
    def attack(self) -> Attack:
        return attack_named(self.name)

    @property
    def param_dict(self) -> Dict[str, object]:
        return dict(self.params)

    @property
    def is_attack(self) -> bool:
        return self.kind != "none"

    @property
    def threat_model(self) -> str:
        return self.norm or self.attack.unbounded_threat

    @property
    def kind(self) -> str:
        """ "transfer" (made on zero-shot CLIP, shared by all adapters), "adaptive" (per adapter) or "none"."""
        return self.attack.kind

    @property
    def is_adaptive(self) -> bool:
        return self.kind == "adaptive"

    def replace(self, eps: Optional[float] = None, **params) -> "AttackSpec":
        """A copy with another eps and/or parameters (unchecked: for sanity-check variants and tests)."""
        merged = {**self.param_dict, **params}
        return AttackSpec(self.name, self.norm, self.eps if eps is None else float(eps), tuple(sorted(merged.items())))

    def cost(self) -> Dict[str, object]:
        """What the attack costs per image, from its parameters (measured figures come with the results).

        forward / backward: passes of the attacked model per image; unit: what one pass is
        ("zero-shot center view" for transfer attacks, "adaptation" of the whole pipeline
        for adaptive ones); shared: whether one attack serves every adapter of the run.
        """
        return self.attack.cost(self)

    def to_dict(self) -> Dict[str, object]:
        return {"name": self.name, "norm": self.norm, "eps": self.eps, **self.param_dict}

    def describe(self) -> str:
        if not self.is_attack:
            return "none (clean only)"
        parts = [self.kind, self.norm or "L2, unbounded"] if self.is_adaptive else [self.norm or "L2, unbounded"]
        if self.eps is not None:
            parts.append(f"eps={format_eps(self.eps, self.norm)}")
        for key, value in self.params:
            if key == "alpha":
                value = format_eps(value, self.norm)
            if key == "norm":
                continue
            parts.append(f"{key}={value}")
        return f"{self.name} ({', '.join(parts)})"

    def build(self, model: nn.Module, n_classes: int, seed: int = 0):
        return self.attack.build(model, self, n_classes, seed)


def make_attack(
    name: str = "pgd",
    eps: Optional[float] = None,
    steps: Optional[int] = None,
    alpha: Optional[float] = None,
    backbone_kind: str = "vit",
    image_size: Optional[int] = None,
    **params,
) -> AttackSpec:
    """Resolve an attack by name. Defaults: the paper's protocol for the backbone kind.

    eps / alpha: [0,1] pixel units (4/255), L2 norm for L2 attacks. None: L-inf attacks
    use the paper's eps (4/255 ViT, 1/255 ResNet), L2 attacks 0.5; alpha = eps/4.
    steps: iterations (pgd's default is the paper's: 100 ViT, 1 ResNet). Other parameters
    by keyword, as `atpt list attacks` shows them.
    """
    key = resolve_attack_name(name)
    attack = attack_named(key)
    if backbone_kind not in PAPER_EPS:
        raise ValueError(f"backbone_kind must be one of {sorted(PAPER_EPS)}, got {backbone_kind!r}")
    resolved = dict(attack.defaults)
    unknown = sorted(set(params) - set(resolved))
    if unknown:
        own = ", ".join(["eps", *resolved]) if attack.norm_of(resolved) else ", ".join(resolved) or "none"
        raise ValueError(f"attack {key!r} has no parameter {', '.join(map(repr, unknown))}; its parameters: {own}")
    resolved.update(params)
    norm = attack.norm_of(resolved)
    if norm is None:
        if eps is not None:
            raise ValueError(f"attack {key!r} takes no eps (it has no fixed budget)")
        if alpha is not None:
            raise ValueError(f"attack {key!r} takes no alpha")
    else:
        if eps is None:
            eps = PAPER_EPS[backbone_kind] if norm == "Linf" else DEFAULT_L2_EPS
        eps = check_eps(eps, norm, image_size)
    if "alpha" in resolved:
        alpha = eps / 4 if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= eps:
            raise ValueError(
                f"alpha (the step size) must be in (0, eps={format_eps(eps, norm)}], in the unit of eps; got {alpha!r}"
            )
        resolved["alpha"] = float(alpha)
    elif alpha is not None:
        raise ValueError(f"attack {key!r} takes no alpha")
    if "steps" in resolved:
        if steps is None:
            steps = PAPER_STEPS[backbone_kind] if resolved["steps"] is None else resolved["steps"]
        _check_count("steps", steps)
        resolved["steps"] = steps
    elif steps is not None:
        raise ValueError(f"attack {key!r} takes no steps")
    return AttackSpec(key, norm, eps, tuple(sorted(attack.validate(resolved).items())))


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_counts(params: Dict[str, object], *names: str) -> None:
    """Positive-integer parameters, for attacks' `validate`."""
    for name in names:
        _check_count(name, params[name])


def check_choice(params: Dict[str, object], name: str, choices) -> None:
    if params[name] not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {params[name]!r}")


def chunk_seed(seed: int, start: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


def run_attack(
    spec: AttackSpec, classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int
) -> torch.Tensor:
    """Adversarial versions of a batch by a transfer attack on the zero-shot classifier, made
    on its device and returned on the CPU.

    The random start draws from a generator seeded with `seed` alone, so a batch gives
    the same images whichever process attacks it.
    """
    if not spec.is_attack:
        return images.detach().cpu().clone()
    device = classifier.backbone.device
    attack = spec.build(classifier, len(classifier.classnames), seed)
    devices = [device.index or 0] if device.type == "cuda" else []
    # evaluation_mode: torchattacks would leave a model it found in training mode (as a fresh
    # classifier module is) in training mode, recursively, wrapped CLIP included
    with (
        torch.random.fork_rng(devices=devices),
        torch.inference_mode(False),
        torch.enable_grad(),
        evaluation_mode(classifier),
    ):
        torch.manual_seed(seed)
        adversarial = attack(images.to(device), labels.to(device))
    return adversarial.detach().float().cpu()
