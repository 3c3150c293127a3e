"""Every setting of a test-time adapter, validated in one place.

A preset is an `AdapterConfig`; a keyword override is `dataclasses.replace` on it, so
an unknown or out-of-range setting fails here, before any model is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from .aggregators import AGGREGATORS, Aggregator
from .augmenters import AUGMENTERS, Augmenter
from .explainers import AUTO, EXPLAINERS, Explainer
from .input_defences import INPUT_DEFENCES, InputDefence
from .objectives import OBJECTIVES
from .registry import Registry

INPUT_GRADIENTS = ("fixed_prompt", "bpda", "exact")  # how logits are differentiated w.r.t. the input

# The component settings: a registered name, or an object satisfying the interface.
COMPONENTS = {  # field -> (registry, what an object must be)
    "objective": (OBJECTIVES, "a callable (logits[, text_features, logit_scale]) -> scalar loss"),
    "explainer": (EXPLAINERS, Explainer),
    "augmenter": (AUGMENTERS, Augmenter),
    "aggregator": (AGGREGATORS, Aggregator),
    "input_defence": (INPUT_DEFENCES, InputDefence),  # also None: the image as given
}


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of the episodic loop (docs/method.md §1-§5); defaults are A-TPT's (paper)."""

    # input defence: changes the image before any view is made (None: the image as given)
    input_defence: Union[None, str, InputDefence] = None  # "ttc": test-time counterattack (Xing et al.)
    ttc_eps: float = 4 / 255  # TTC's L-inf budget in [0,1] pixel units
    ttc_steps: int = 2  # signed ascent steps on ||f(x + delta) - f(x)||^2
    ttc_alpha: float = 1 / 255  # step size
    ttc_tau_threshold: float = 0.2  # counterattack only where tau (relative embedding change) is below this
    ttc_beta: float = 2.0  # step k's delta weighs softmax(beta * k)
    # views and tuning
    views: int = 64  # K: the center crop plus K-1 augmented views
    rho: float = 0.1  # confident fraction; max(1, int(K * rho)) views kept
    lr: float = 5e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW default
    steps: int = 1  # tuning steps per image; 0 = no tuning
    objective: Union[str, Any] = "mean_entropy"  # or "marginal_entropy" (TPT); a name or a callable
    dispersion_weight: float = 50.0  # objective "ctpt": C-TPT's lambda (authors: 50 fine-grained, 20 natural shift)
    orthogonality_weight: float = 18.0  # objective "otpt": O-TPT's lambda (authors: 18 fine-grained, 2 natural shift)
    # prompt
    ctx_init: Optional[str] = "a photo of a"  # None: random context of n_ctx tokens
    domain_word: Optional[str] = None  # "pet" turns "a photo of a" into "a pet photo of a"
    n_ctx: int = 4  # only used when ctx_init is None
    # explainer
    explainer: Union[str, Explainer] = AUTO  # auto: the backbone's default (ViT: token_grad_rollout)
    token_site: str = "normed"  # "normed" (after ln_1, well conditioned) or "input" (literal)
    rollout_layers: str = "last_two"  # "last_two" (A-TPT) or "all"
    layer_weights: Tuple[float, float] = (1.0, 1.0)  # (block B-1, block B); authors' code: (0.5, 1.0)
    row_normalize: bool = True  # authors' code row-normalises each refined block matrix
    clip_quantile: float = 0.99  # maps are clipped at this quantile, then min-max scaled
    gradcam_sharpen: bool = False  # authors' RN50 code: (ReLU(cam - 0.2) / max) ** 2
    explainer_eps: float = 0.0  # added to every divisor of the maps' normalisations
    # (authors' code: 1e-8); 0 divides exactly
    # augmenter
    augmenter: Union[str, Augmenter] = "attention_mix"
    base_crop: str = "center"  # "center" (paper: flip + center crop) or "random_resized" (code)
    crop_source: str = "resized"  # bases cropped from the image resized to the model size, or from
    # the "original" image, antialiased (authors' code, PIL)
    input_quantization: Optional[str] = None  # "uint8_floor": x -> floor(255 x) / 255 before the views,
    # the authors' PIL round trip of adversarial images
    augmix_ops: bool = True  # False: crop + flip only (TPT's ImageNet convention)
    mask_rule: str = "top_k"  # "top_k" (paper, ceil(r*H*W)) or "quantile" (authors' code)
    r: float = 0.2  # high-attention area fraction (top_k rule)
    m_high: float = 0.2  # augmentation weight on high-attention pixels
    m_low: float = 0.8  # augmentation weight on the rest
    p_high: float = 0.2  # quantile rule: top fraction that is "high"
    p_low: float = 0.8  # quantile rule: bottom fraction that is "low"
    # aggregator
    aggregator: Union[str, Aggregator] = "tv"
    tv_temperature: float = 1.0  # w = softmax(-TV / temperature)
    tv_map_size: Optional[int] = None  # None: TV on the patch-grid map; int: upsampled first
    reliability_k: int = 20  # R-TPT: top-k similarities per view
    reliability_temperature: float = 0.01
    mean_over: str = "confident"  # "confident" (the set B) or "all" views
    # timm classifiers (no text): what is tuned instead of the prompt context
    classifier_tuning: str = "norm"  # "norm": LayerNorm affine (TENT); "prompt": VPT-shallow tokens
    vpt_tokens: int = 4  # visual prompt tokens for classifier_tuning="prompt"
    # adaptive attacks: how logits are differentiated w.r.t. an input that requires grad
    input_gradient: str = "fixed_prompt"  # "fixed_prompt", "bpda" or "exact" (through the tuning step)
    # speed
    precision: str = "fp32"  # "bf16" / "fp16": autocast the image-tower passes
    compile: bool = False  # torch.compile the views' image-tower pass (see README)
    image_batch: Optional[int] = None  # test images adapted together (independent prompts, one
    # pass per stage); None: 8 on a GPU, 1 on a CPU, where
    # batching is slower (docs/performance.md); results do not depend on it
    # reproducibility
    seed: Optional[int] = 0  # None: fresh randomness on every call

    def __post_init__(self):
        for name in COMPONENTS:
            _check_component(name, getattr(self, name))
        _check_choice("token_site", self.token_site, ("normed", "input"))
        _check_choice("rollout_layers", self.rollout_layers, ("last_two", "all"))
        _check_choice("base_crop", self.base_crop, ("center", "random_resized"))
        _check_choice("crop_source", self.crop_source, ("resized", "original"))
        _check_choice("input_quantization", self.input_quantization, (None, "uint8_floor"))
        _check_choice("mask_rule", self.mask_rule, ("top_k", "quantile"))
        _check_choice("mean_over", self.mean_over, ("confident", "all"))
        _check_choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _check_choice("input_gradient", self.input_gradient, INPUT_GRADIENTS)
        _check_choice("classifier_tuning", self.classifier_tuning, ("norm", "prompt"))
        _check_int("views", self.views, 1)
        _check_int("ttc_steps", self.ttc_steps, 0)
        for name in ("ttc_eps", "ttc_alpha", "ttc_tau_threshold", "ttc_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.ttc_eps >= 1:
            raise ValueError(f"ttc_eps is in [0,1] pixel units (4/255 = {4 / 255:.6f}), got {self.ttc_eps!r}")
        _check_int("steps", self.steps, 0)
        _check_int("n_ctx", self.n_ctx, 1)
        _check_int("reliability_k", self.reliability_k, 1)
        _check_int("vpt_tokens", self.vpt_tokens, 1)
        if self.image_batch is not None:
            _check_int("image_batch", self.image_batch, 1)
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        for name in ("rho", "r", "p_high", "p_low", "clip_quantile"):
            _check_range(name, getattr(self, name), 0.0, 1.0, low_open=True)
        for name in ("m_high", "m_low"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        for name in ("lr", "tv_temperature", "reliability_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if (
            isinstance(self.explainer_eps, bool)
            or not isinstance(self.explainer_eps, (int, float))
            or not 0 <= self.explainer_eps < float("inf")
        ):
            raise ValueError(
                f"explainer_eps must be a finite number >= 0 (the authors' code: 1e-8), got {self.explainer_eps!r}"
            )
        for name in ("dispersion_weight", "orthogonality_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.m_high > self.m_low:
            raise ValueError(
                f"m_high ({self.m_high}) must not exceed m_low ({self.m_low}): high-attention "
                "pixels are the discriminative ones and must be augmented less than the rest"
            )
        if len(self.layer_weights) != 2 or min(self.layer_weights) < 0 or sum(self.layer_weights) <= 0:
            raise ValueError(f"layer_weights must be two non-negative numbers, got {self.layer_weights!r}")
        if self.tv_map_size is not None:
            _check_int("tv_map_size", self.tv_map_size, 2)
        if self.ctx_init is not None and not self.ctx_init.strip():
            raise ValueError("ctx_init must be a non-empty phrase such as 'a photo of a', or None")
        if self.domain_word and (self.ctx_init is None or "photo" not in self.ctx_init.split()):
            raise ValueError(
                f"domain_word is inserted before the word 'photo' of ctx_init, which {self.ctx_init!r} does not contain"
            )
        if self.seed is not None:
            _check_int("seed", self.seed, 0)

    @property
    def n_confident(self) -> int:
        """int(K * rho) as the papers do, but never zero (docs/method.md §9.9)."""
        return max(1, int(self.views * self.rho))

    @property
    def context_phrase(self) -> Optional[str]:
        if self.ctx_init is None or not self.domain_word:
            return self.ctx_init
        return " ".join(f"{self.domain_word} photo" if w == "photo" else w for w in self.ctx_init.split())

    def record(self) -> Dict[str, Any]:
        """The settings as plain values for a run's manifest; a component object becomes
        {"name": its registered name (None if unregistered), "options": {...}}."""
        record = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in COMPONENTS and not isinstance(value, (str, type(None))):
                value = component_record(COMPONENTS[field.name][0], value)
            record[field.name] = list(value) if isinstance(value, tuple) else value
        return record

    def replace(self, **overrides) -> "AdapterConfig":
        """A copy with `overrides`; unknown names list the valid ones."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            hints = {u: difflib.get_close_matches(u, known, n=1) for u in unknown}
            said = ", ".join(f"{u!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for u, h in hints.items())
            raise TypeError(f"unknown adapter setting {said}; valid settings: {', '.join(sorted(known))}")
        if "layer_weights" in overrides:
            overrides["layer_weights"] = tuple(overrides["layer_weights"])
        return dataclasses.replace(self, **overrides)


def _check_component(field: str, value) -> None:
    registry, interface = COMPONENTS[field]
    if value is None and field == "input_defence":
        return
    if isinstance(value, str):
        if value not in registry and not (field == "explainer" and value == AUTO):
            raise registry.unknown(value)
        return
    satisfied = callable(value) if isinstance(interface, str) else isinstance(value, interface)
    if not satisfied:
        wanted = (
            interface if isinstance(interface, str) else f"an instance of {interface.__module__}.{interface.__name__}"
        )
        raise TypeError(f"{field}={value!r} is neither a registered name ({', '.join(registry.names())}) nor {wanted}")


def component_record(registry: Registry, value) -> Dict[str, Any]:
    """A component object as its registered name and options (name None: unregistered)."""
    if hasattr(value, "record"):
        return value.record()
    return {"name": registry.name_of(value), "options": {}}


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of: {', '.join(map(str, choices))}")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_range(name, value, low, high, low_open=False):
    ok = (low < value if low_open else low <= value) and value <= high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value!r}")
