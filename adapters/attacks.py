"""Threat models on torchattacks: transfer attacks against the zero-shot model, adaptive ones by name.

The paper's protocol (docs/method.md §6) is a transfer attack: untargeted L-inf PGD with
a random start and cross-entropy on the true label, against zero-shot CLIP with the
initial prompt, on the center crop in [0,1] (eps 4/255, step eps/4, 100 steps for ViTs;
eps 1/255, 1 step for RN50). The attack does not depend on the adapter, so its images are
computed once, batched on the device, and cached per (model, dataset, attack, seed)
(`cache.py`): six adapters compared on one set cost one attack.

Adaptive attacks (`eot-pgd`, `square`; kind "adaptive") attack each wrapped adapter
itself, the whole test-time pipeline, per image; they are run by `adaptive.py` inside
the evaluation loop, not here, and are not cached (the per-sample results file makes
such a run resumable).

Units. In Python (`make_attack`, `benchmark`) `eps` and `alpha` are in [0,1] pixel units,
as in torchattacks and RobustBench: pass `4/255`. On the command line (`parse_eps`) a bare
L-inf budget is in 1/255 units, as in the paper and the authors' code (`--eps 4` is
4/255); `4/255` may be written out. L2 budgets are L2 norms of [0,1] images in both.
Values that cannot be meant are rejected with the reading that was probably intended.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from atpt_plugin.adapter import TestTimeAdapter
from atpt_plugin.episodic import evaluation_mode
from atpt_plugin.augmenters import center_view
from atpt_plugin.config import AdapterConfig
from atpt_plugin.inputs import check_images

from .datasets import unknown_name

ZEROSHOT_CONFIG = AdapterConfig(views=1, steps=0, aggregator="single")


# ---- the attacked model -------------------------------------------------------------
class ZeroShotClassifier(nn.Module):
    """Zero-shot CLIP with the initial prompt, batched and differentiable w.r.t. its input.

    Equal to `load_adapter("zeroshot")` (= `atpt` with views=1, steps=0, aggregator
    "single"): the center crop, the frozen initial prompt, no tuning. The class text
    features are computed once at construction; each forward is one image-tower pass over
    the whole batch, so PGD costs one forward and one backward per step.
    """

    def __init__(self, adapter: TestTimeAdapter):
        super().__init__()
        self.model = adapter.model          # a submodule: torchattacks finds the device from it
        self.backbone = adapter.backbone
        self.classnames = list(adapter.classnames)
        self.prompt_phrase = adapter.config.context_phrase
        self.register_buffer("text_features", adapter.zero_shot_text.detach().clone(), persistent=False)

    @classmethod
    def build(cls, model: nn.Module, classnames: Sequence[str], tokenizer, domain_word: Optional[str] = None,
              ctx_init: Optional[str] = "a photo of a") -> "ZeroShotClassifier":
        config = ZEROSHOT_CONFIG.replace(ctx_init=ctx_init, domain_word=domain_word)
        return cls(TestTimeAdapter(model, classnames, tokenizer, config, name="zeroshot"))

    @classmethod
    def from_adapter(cls, adapter: TestTimeAdapter) -> "ZeroShotClassifier":
        """The zero-shot model under `adapter`'s own initial prompt."""
        return cls(adapter)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images).to(self.backbone.device)
        views = center_view(images, self.backbone.image_size)
        features = self.backbone.encode_image(views)
        return self.backbone.logit_scale * features @ self.text_features.t()


# ---- eps ----------------------------------------------------------------------------
def format_eps(value: Optional[float], norm: Optional[str] = "Linf") -> str:
    """L-inf budgets as 4/255 where they sit on the 1/255 grid; L2 budgets as plain numbers."""
    if value is None:
        return "-"
    if norm != "Linf":
        return f"{value:.4g}"
    steps = value * 255
    if abs(steps - round(steps)) < 1e-6:
        return f"{int(round(steps))}/255"
    if abs(steps * 4 - round(steps * 4)) < 1e-6:
        return f"{round(steps, 2):g}/255"
    return f"{value:.4g}"


def parse_eps(text, norm: str = "Linf") -> float:
    """A command-line budget: bare L-inf numbers are in 1/255 units, "a/b" is a fraction.

    `4` and `4/255` both give 4/255 for L-inf; L2 budgets are plain L2 norms ("0.5").
    """
    raw = str(text).strip()
    try:
        if "/" in raw:
            numerator, denominator = raw.split("/")
            value = float(Fraction(numerator.strip())) / float(Fraction(denominator.strip()))
            explicit = True
        else:
            value = float(raw)
            explicit = False
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--eps {raw!r} is not a number: write e.g. 4 or 4/255") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--eps must be > 0, got {raw!r}; for clean accuracy only use --attack none")
    if norm == "Linf" and not explicit:
        if value < 1:
            raise ValueError(
                f"--eps {raw} is ambiguous: L-inf budgets on the command line are in 1/255 units "
                f"(--eps 4 means 4/255), so {raw} would be {raw}/255 = {value / 255:.2g}. "
                f"For {format_eps(value)} write --eps {value * 255:g} or --eps {value * 255:g}/255; "
                f"for a budget below 1/255 write it as a fraction, e.g. --eps {raw}/255")
        value = value / 255
    return value


def check_eps(eps: float, norm: str, image_size: Optional[int] = None) -> float:
    """Reject budgets in the wrong unit or so large that every image can become every other."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a positive number in [0,1] pixel units (e.g. 4/255), got {eps!r}")
    if norm == "Linf":
        if eps >= 1:
            raise ValueError(
                f"eps={eps:g} is not in [0,1] pixel units: in Python eps is a fraction of the "
                f"pixel range, as in torchattacks and RobustBench; for {eps:g}/255 pass eps={eps:g}/255")
        if eps >= 0.5:
            raise ValueError(f"eps={eps:g} (L-inf) lets the attacker turn every image into plain gray; "
                             "did you mean eps=" f"{eps:g}/255?")
    elif image_size is not None:
        limit = 0.5 * math.sqrt(3 * image_size * image_size)
        if eps >= limit:
            raise ValueError(f"L2 eps={eps:g} reaches {limit:.1f}, the distance at which any "
                             f"{image_size}x{image_size} image can become plain gray")
    return float(eps)


# ---- attacks by name ----------------------------------------------------------------
@dataclass(frozen=True)
class AttackKind:
    name: str
    norm: Optional[str]          # "Linf", "L2", or None (no budget: CW, none)
    description: str
    defaults: Tuple[Tuple[str, object], ...]
    build: Optional[Callable]    # (model, spec, n_classes, seed) -> torchattacks.Attack; None: not a transfer attack
    kind: str = "transfer"       # "transfer" (on zero-shot CLIP, shared), "adaptive" (on each adapter), "none"


def _pgd(model, spec, n_classes, seed):
    import torchattacks
    p = spec.param_dict
    return torchattacks.PGD(model, eps=spec.eps, alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"])


def _fgsm(model, spec, n_classes, seed):
    import torchattacks
    return torchattacks.FGSM(model, eps=spec.eps)


def _pgdl2(model, spec, n_classes, seed):
    import torchattacks
    p = spec.param_dict
    return torchattacks.PGDL2(model, eps=spec.eps, alpha=p["alpha"], steps=p["steps"], random_start=p["random_start"])


def _cw(model, spec, n_classes, seed):
    import torchattacks
    p = spec.param_dict
    return torchattacks.CW(model, c=p["c"], kappa=p["kappa"], steps=p["steps"], lr=p["lr"])


def _autoattack(model, spec, n_classes, seed):
    import torchattacks
    p = spec.param_dict
    return torchattacks.AutoAttack(model, norm=spec.norm, eps=spec.eps, version=p["version"],
                                   n_classes=n_classes, seed=seed)


ATTACKS: Dict[str, AttackKind] = {kind.name: kind for kind in [
    AttackKind("pgd", "Linf", "untargeted L-inf PGD, random start, CE on the true label (the paper's protocol)",
               (("steps", 100), ("alpha", None), ("random_start", True)), _pgd),
    AttackKind("fgsm", "Linf", "one signed-gradient step of size eps", (), _fgsm),
    AttackKind("pgdl2", "L2", "untargeted L2 PGD, random start", (("steps", 100), ("alpha", None),
                                                                   ("random_start", True)), _pgdl2),
    AttackKind("cw", None, "Carlini-Wagner L2 (unbounded; c, kappa, steps, lr)",
               (("c", 1.0), ("kappa", 0.0), ("steps", 100), ("lr", 0.01)), _cw),
    AttackKind("autoattack", "Linf", "AutoAttack (torchattacks): APGD-CE, APGD-T, FAB-T, Square; norm Linf or L2",
               (("version", "standard"), ("norm", "Linf")), _autoattack),
    AttackKind("eot-pgd", "Linf", "adaptive: L-inf PGD on each adapter's whole pipeline, gradients averaged over "
               "eot_iter fresh draws of its random views per step; gradient path bpda, exact or fixed_prompt",
               (("steps", 20), ("alpha", None), ("eot_iter", 4), ("gradient", "bpda"), ("loss", "ce"),
                ("random_start", True)), None, "adaptive"),
    AttackKind("square", "Linf", "adaptive, gradient-free: torchattacks' Square (random search) on each adapter's "
               "whole pipeline as deployed; exposes gradient masking",
               (("n_queries", 1000), ("p_init", 0.8), ("loss", "margin"), ("norm", "Linf")), None, "adaptive"),
    AttackKind("none", None, "no attack: clean accuracy only", (), None, "none"),
]}

GRADIENT_PATHS = ("bpda", "exact", "fixed_prompt")   # AdapterConfig.input_gradient

PAPER_EPS = {"vit": 4 / 255, "resnet": 1 / 255}      # docs/method.md §6
PAPER_STEPS = {"vit": 100, "resnet": 1}
DEFAULT_L2_EPS = 0.5


@dataclass(frozen=True)
class AttackSpec:
    """A named attack with every parameter resolved; `eps`/`alpha` in [0,1] pixel units."""

    name: str
    norm: Optional[str]
    eps: Optional[float]
    params: Tuple[Tuple[str, object], ...] = ()

    @property
    def param_dict(self) -> Dict[str, object]:
        return dict(self.params)

    @property
    def is_attack(self) -> bool:
        return self.name != "none"

    @property
    def threat_model(self) -> str:
        return self.norm or ("L2" if self.name == "cw" else "none")

    @property
    def kind(self) -> str:
        """"transfer" (made on zero-shot CLIP, shared by all adapters), "adaptive" (per adapter) or "none"."""
        return ATTACKS[self.name].kind

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
        p = self.param_dict
        if self.kind == "none":
            return {"forward": 0, "backward": 0, "unit": None, "shared": True}
        if self.kind == "transfer":
            steps = {"fgsm": 1}.get(self.name, p.get("steps"))
            return {"forward": steps, "backward": steps, "unit": "zero-shot center view", "shared": True}
        if self.name == "eot-pgd":
            n = p["steps"] * p["eot_iter"]
            return {"forward": n, "backward": n, "unit": "adaptation", "shared": False}
        return {"forward": p["n_queries"], "backward": 0, "unit": "adaptation (at most)",
                "shared": False}

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
        kind = ATTACKS[self.name]
        if kind.build is None:
            raise ValueError(f"attack {self.name!r} builds no transfer attack"
                             + (" (adaptive attacks run per adapter: adaptive.run_adaptive)" if self.is_adaptive else ""))
        return kind.build(model, self, n_classes, seed)


def resolve_attack_name(name: str) -> str:
    """The registry key of an attack name (case, '-' and '_' ignored); unknown names list the valid ones."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = {"pgdlinf": "pgd", "linfpgd": "pgd", "l2pgd": "pgdl2", "aa": "autoattack", "clean": "none",
           "cwl2": "cw", "eotpgd": "eot-pgd", "adaptivepgd": "eot-pgd", "squareattack": "square"}.get(key, key)
    if key not in ATTACKS:
        raise unknown_name("attack", name, list(ATTACKS))
    return key


def make_attack(name: str = "pgd", eps: Optional[float] = None, steps: Optional[int] = None,
                alpha: Optional[float] = None, backbone_kind: str = "vit", image_size: Optional[int] = None,
                **params) -> AttackSpec:
    """Resolve an attack by name. Defaults: the paper's protocol for the backbone kind.

    eps / alpha: [0,1] pixel units (4/255), L2 norm for L2 attacks. None: pgd/fgsm/
    autoattack use the paper's eps (4/255 ViT, 1/255 ResNet), pgdl2 0.5; alpha = eps/4.
    steps: PGD iterations (paper: 100 ViT, 1 ResNet), CW optimisation steps.
    Other parameters by keyword: random_start (pgd, pgdl2, eot-pgd), c, kappa, lr (cw),
    version and norm (autoattack); eot-pgd (adaptive, default 20 steps): eot_iter (fresh
    view draws per step), gradient ("bpda", "exact", "fixed_prompt"), loss ("ce",
    "margin"); square (adaptive, gradient-free): n_queries, p_init, loss, norm.
    """
    key = resolve_attack_name(name)
    kind = ATTACKS[key]
    if backbone_kind not in PAPER_EPS:
        raise ValueError(f"backbone_kind must be one of {sorted(PAPER_EPS)}, got {backbone_kind!r}")
    resolved = dict(kind.defaults)
    unknown = sorted(set(params) - set(resolved))
    if unknown:
        raise ValueError(f"attack {key!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(['eps', *resolved]) if kind.norm else ', '.join(resolved) or 'none'}")
    resolved.update(params)
    norm = kind.norm
    if key in ("autoattack", "square"):
        if resolved["norm"] not in ("Linf", "L2"):
            raise ValueError(f"{key} norm must be 'Linf' or 'L2', got {resolved['norm']!r}")
        norm = resolved["norm"]
        if key == "autoattack" and resolved["version"] not in ("standard", "plus", "rand"):
            raise ValueError(f"autoattack version must be standard, plus or rand, got {resolved['version']!r}")
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
            raise ValueError(f"alpha (the step size) must be in (0, eps={format_eps(eps, norm)}], in the unit "
                             f"of eps; got {alpha!r}")
        resolved["alpha"] = float(alpha)
    elif alpha is not None:
        raise ValueError(f"attack {key!r} takes no alpha")
    if "steps" in resolved:
        if steps is None:
            steps = PAPER_STEPS[backbone_kind] if key == "pgd" else resolved["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        resolved["steps"] = steps
    elif steps is not None:
        raise ValueError(f"attack {key!r} takes no steps")
    for number in ("c", "kappa", "lr"):
        if number in resolved:
            resolved[number] = float(resolved[number])
    for count in ("eot_iter", "n_queries"):
        if count in resolved:
            value = resolved[count]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{count} must be a positive integer, got {value!r}")
    if "gradient" in resolved and resolved["gradient"] not in GRADIENT_PATHS:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENT_PATHS)} (how the attack differentiates "
                         f"through the tuning step), got {resolved['gradient']!r}")
    if "loss" in resolved and resolved["loss"] not in ("ce", "margin"):
        raise ValueError(f"loss must be 'ce' or 'margin', got {resolved['loss']!r}")
    if "p_init" in resolved:
        resolved["p_init"] = float(resolved["p_init"])
        if not 0 < resolved["p_init"] <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {resolved['p_init']!r}")
    if "random_start" in resolved:
        resolved["random_start"] = bool(resolved["random_start"])
    return AttackSpec(key, norm, eps, tuple(sorted(resolved.items())))


def chunk_seed(seed: int, start: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{start}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2 ** 63)


def run_attack(spec: AttackSpec, classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor,
               seed: int) -> torch.Tensor:
    """Adversarial versions of a batch, on the classifier's device, returned on the CPU.

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
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad(), \
            evaluation_mode(classifier):
        torch.manual_seed(seed)
        adversarial = attack(images.to(device), labels.to(device))
    return adversarial.detach().float().cpu()
