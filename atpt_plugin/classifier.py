"""The episodic loop for a timm image classifier: no class names, the model's head gives the logits.

Per test image, independently of every other (docs/method.md §1 with the prompt context
replaced by a few classifier parameters):
1. explain the base views with the unchanged model (score: sum of top-1 head logits);
2. build the views with the configured augmenter;
3. forward all views with the initial parameters, keep the confident (lowest-entropy) ones;
4. tune fresh copies of the tuned parameters for `steps` AdamW steps (`tuning.adamw`, the
   CLIP loop's) on the entropy objective over the confident views; `input_gradient`
   ("bpda", "exact") keeps the step differentiable for adaptive attacks, as for CLIP;
5. re-encode the views the aggregator reads with the tuned parameters (for a classifier the
   image features depend on them) and aggregate.

Tuned parameters ("classifier_tuning"):
- "norm" (default, as TENT): the affine weights and biases of every normalisation layer
  (the LayerNorms of a ViT; BatchNorm/GroupNorm affine of a conv net, BatchNorm keeping its
  running statistics);
- "prompt" (VPT-shallow, ViTs only): `vpt_tokens` learnable tokens inserted after the
  prefix (class/distillation/register) tokens before block 0, initialised as VPT does
  (uniform, same values for every image) and dropped before pooling. The explainer still
  reads the model without prompts; selection and tuning start from the initial prompts.

The model is never changed: tuned tensors are copies passed with `torch.func.functional_call`,
gradients are taken with `torch.autograd.grad` (no `.grad` is written), train/eval flags are
restored. Features for the reliability and MTA-style aggregators are the initial model's.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .aggregators import ViewPredictions
from .backbones.timm_common import is_timm_model, timm_backbone, top1_class_score
from .backbones.timm_vit import TimmVitBackbone
from .config import AdapterConfig
from .episodic import EpisodicAdapter
from .objectives import select_confident, text_inputs
from .tuning import adamw


def _norm_types():
    types = [nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm]
    if hasattr(nn, "RMSNorm"):
        types.append(nn.RMSNorm)
    import timm.layers as layers

    types += [
        getattr(layers, n)
        for n in ("RmsNorm", "RmsNorm2d", "SimpleNorm", "SimpleNorm2d")
        if isinstance(getattr(layers, n, None), type)
    ]
    return tuple(types)


def norm_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """{name: parameter} of the affine weights and biases of every normalisation layer (TENT)."""
    types = _norm_types()
    found = {}
    for module_name, module in model.named_modules():
        if isinstance(module, types):
            for name, param in module.named_parameters(recurse=False):
                found[f"{module_name}.{name}" if module_name else name] = param
    return found


class _Forward(nn.Module):
    """model(images) -> (logits, L2-normalised pre-logits features), optionally with VPT prompts."""

    def __init__(self, model: nn.Module, backbone):
        super().__init__()
        self.model = model
        self.backbone = backbone

    def forward(self, x: torch.Tensor, prompts: Optional[torch.Tensor] = None):
        model = self.model
        if prompts is None:
            tokens = model.forward_features(x)
        else:
            tokens, _ = self.backbone.embed(x)
            prefix, count = model.num_prefix_tokens, prompts.shape[0]
            inserted = prompts.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([tokens[:, :prefix], inserted, tokens[:, prefix:]], dim=1)
            tokens = model.norm(model.blocks(tokens))
            tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix + count :]], dim=1)
        logits = model.forward_head(tokens)
        features = model.forward_head(tokens, pre_logits=True)
        return logits, F.normalize(features.float().flatten(1), dim=-1)


class ClassifierTestTimeAdapter(EpisodicAdapter):
    """A wrapped timm classifier: `forward(images in [0,1]) -> (B, num_classes)` logits, each
    image adapted alone, the model unchanged afterwards.

    `config` is the same `AdapterConfig` as for CLIP (views, selection, objective, lr,
    steps, explainer, augmenter, aggregator); prompt-text settings do not apply and are
    ignored, and so are the CLIP loop's speed settings (`image_batch`: images go one at a
    time); `classifier_tuning` ("norm" or "prompt") and `vpt_tokens` choose what is tuned.
    `image_size` overrides the view size for models created with `dynamic_img_size=True`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig = AdapterConfig(),
        name: str = "atpt",
        image_size: Optional[int] = None,
    ):
        super().__init__(model, timm_backbone(model, image_size), config, name)
        if config.compile:
            raise ValueError(
                "compile=True compiles the CLIP image tower's view pass; a timm classifier "
                "is run through torch.func.functional_call, which it does not cover: "
                "leave compile=False"
            )
        tuning, vpt_tokens = config.classifier_tuning, config.vpt_tokens
        self.tuning = tuning
        self.num_classes = getattr(model, "num_classes", 0)
        if not self.num_classes:
            raise ValueError(
                f"{type(model).__name__} has no classifier head (num_classes=0): "
                "test-time entropy tuning needs class logits"
            )
        if tuning == "norm":
            self.tuned_names = sorted(norm_parameters(model))
            if not self.tuned_names and config.steps > 0:
                raise ValueError(
                    f"{type(model).__name__} has no normalisation layer with affine "
                    "parameters to tune; use classifier_tuning='prompt' (ViTs) or steps=0"
                )
            self.register_buffer("initial_prompts", None, persistent=False)
        else:
            if not isinstance(self.backbone, TimmVitBackbone):
                raise ValueError(
                    "classifier_tuning='prompt' (VPT) inserts tokens into a ViT; "
                    f"{type(model).__name__} is not a timm VisionTransformer: use classifier_tuning='norm'"
                )
            self.tuned_names = []
            patch = model.patch_embed.patch_size
            bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + model.embed_dim))  # VPT's init
            generator = torch.Generator().manual_seed(config.seed or 0)
            prompts = torch.empty(vpt_tokens, model.embed_dim).uniform_(-bound, bound, generator=generator)
            self.register_buffer(
                "initial_prompts", prompts.to(self.backbone.device, self.backbone.dtype), persistent=False
            )
        self.build_components()
        if text_inputs(self.objective):
            raise ValueError(
                f"adapter {name!r} uses objective={config.objective!r}, which reads the prompt's "
                f"{' and '.join(text_inputs(self.objective))}; a timm classifier has no text side: "
                "use a CLIP model with classnames=..., or an entropy objective (marginal_entropy, mean_entropy)"
            )
        needs_text = self.aggregator.needs_text
        if needs_text:
            raise ValueError(
                f"adapter {name!r} uses aggregator={config.aggregator!r}, which needs a text encoder "
                f"({needs_text}); a timm classifier has none: use a CLIP model with classnames=..., "
                "or another aggregator (tv, reliability, mean, single)"
            )

    def extra_repr(self) -> str:
        return f"name={self.name!r}, classes={self.num_classes}, tuning={self.tuning!r}, config={self.config}"

    @property
    def num_outputs(self) -> int:
        return self.num_classes

    def explanation_score(self):
        """S = top-1 logit of the unchanged classifier."""
        return top1_class_score(self.backbone)

    # the episodic loop ----------------------------------------------------------
    def run(
        self, x: torch.Tensor, params: Optional[Dict[str, torch.Tensor]] = None, prompts: Optional[torch.Tensor] = None
    ):
        """(logits, features) of normalised images with `params` replacing the model's own."""
        forward = _Forward(self.model, self.backbone)
        named = {f"model.{name}": value for name, value in (params or {}).items()}
        with self.image_precision():
            logits, features = functional_call(forward, named, (x, prompts))
        return logits.float(), features

    def adapt_images(self, images: torch.Tensor, track_input: bool = False) -> torch.Tensor:
        host = images.detach().float().cpu()  # one transfer for the per-image seeds
        return torch.stack(
            [self.adapt(image, self.generator_for(seen), track_input) for image, seen in zip(images, host)]
        )

    def adapt(self, image: torch.Tensor, generator: torch.Generator, track_input: bool) -> torch.Tensor:
        """The episodic loop for one (3,H,W) image; returns (num_classes,) logits."""
        config = self.config
        views = self.make_views(image, generator)
        x = self.backbone.normalize(views)
        with torch.no_grad():
            initial_logits, features = self.run(x.detach(), prompts=self.initial_prompts)
        confident = select_confident(initial_logits, config.n_confident)
        path = config.input_gradient if track_input else "fixed_prompt"
        if config.steps > 0 and path != "fixed_prompt":
            params, prompts = self.tune(x, confident, path)
        elif config.steps > 0:
            params, prompts = self.tune(x.detach(), confident)
        else:
            params, prompts = {}, self.initial_prompts
        if config.steps == 0 and not track_input:
            logits = initial_logits
        else:
            needed = self.aggregator.views_read(confident, len(views))
            with torch.set_grad_enabled(track_input):
                read, _ = self.run(x if needed is None else x[needed], params, prompts)
            if needed is None:
                logits = read
            else:  # rows the aggregator never reads stay NaN, so a wrong guess fails loudly
                logits = initial_logits.new_full(initial_logits.shape, float("nan")).to(read.dtype)
                logits = logits.index_put((needed,), read)
        predictions = ViewPredictions(
            logits=logits,
            features=features,
            confident=confident,
            view_maps=lambda indices: self.explain(views[indices].detach()),
            zero_shot_logits=initial_logits,
        )
        return self.aggregator(predictions)

    def tune(self, x: torch.Tensor, confident: torch.Tensor, path: str = "none"):
        """Fresh copies of the tuned tensors, `steps` steps of `tuning.adamw` (the CLIP loop's
        AdamW; elementwise, so one flat vector of all tuned tensors is exact); returns (params, prompts).

        The confident set is re-selected under the current parameters at every step, as the
        CLIP loop does (for one step that is the initial set). `path` ("bpda", "exact") keeps
        the result differentiable w.r.t. `x`, for adaptive attacks.
        """
        config = self.config
        tensors = [self.model.get_parameter(name).detach() for name in self.tuned_names]
        if self.initial_prompts is not None:
            tensors.append(self.initial_prompts.detach())
        sizes = [t.numel() for t in tensors]

        def split(flat: torch.Tensor):
            parts = [part.view_as(t) for part, t in zip(flat.split(sizes), tensors)]
            prompts = parts.pop() if self.initial_prompts is not None else None
            return dict(zip(self.tuned_names, parts)), prompts

        steps_done = []

        def loss(flat: torch.Tensor) -> torch.Tensor:
            params, prompts = split(flat)
            chosen = confident
            if steps_done:
                with torch.no_grad():
                    current = {name: value.detach() for name, value in params.items()}
                    chosen = select_confident(
                        self.run(x.detach(), current, None if prompts is None else prompts.detach())[0],
                        config.n_confident,
                    )
            steps_done.append(1)
            logits, _ = self.run(x[chosen], params, prompts)
            return self.objective(logits)

        kernels = sdpa_kernel(SDPBackend.MATH) if path != "none" else contextlib.nullcontext()
        with kernels:  # fused attention kernels have no double backward
            flat = adamw(
                torch.cat([t.flatten() for t in tensors]), loss, config.steps, config.lr, config.weight_decay, path=path
            )
        return split(flat)


def wrap_classifier(
    model: nn.Module, config: AdapterConfig = AdapterConfig(), name: str = "atpt"
) -> ClassifierTestTimeAdapter:
    """What `Adapter.wrap(model)` returns without class names: test-time adaptation of a timm classifier."""
    if not is_timm_model(model):
        raise TypeError(
            f"without classnames the model must be a timm image classifier (timm.create_model(...)), got "
            f"{type(model).__name__}; for a CLIP model pass classnames=[...] and tokenizer=..."
        )
    return ClassifierTestTimeAdapter(model, config, name)
