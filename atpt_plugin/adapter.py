"""The episodic test-time loop for CLIP (docs/method.md §1) as an `nn.Module` on [0,1] images.

Per test image, independently of every other: explain the base views with the initial
prompt, build the views, encode them once, select the confident ones, tune a fresh copy
of the prompt context, and aggregate the tuned predictions. Image features do not depend
on the prompt, so one image pass serves selection, tuning and the final prediction.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .aggregators import ViewPredictions
from .backbones import detect
from .config import AdapterConfig
from .episodic import EpisodicAdapter, evaluation_mode
from .explainers import top1_logit_score
from .objectives import objective_call, select_confident
from .prompt import PromptLearner
from .tuning import adamw


class TestTimeAdapter(EpisodicAdapter):
    """A wrapped CLIP: `forward(images in [0,1]) -> (B, C) logits`, each image adapted alone.

    The wrapped model is never changed: its parameters are only read, gradients are taken
    with `torch.autograd.grad` on activations and on the prompt context (so no `.grad` is
    written), and its train/eval flags are restored after every call. Works under
    `torch.no_grad()` and `torch.inference_mode()`. When the caller tracks gradients of
    the input, the returned logits are differentiable w.r.t. it through the views' image
    features and, by `config.input_gradient`, through the tuning step ("bpda", "exact") or
    with the tuned prompt held fixed ("fixed_prompt", the default).
    """

    def __init__(
        self,
        model: nn.Module,
        classnames: Sequence[str],
        tokenizer,
        config: AdapterConfig = AdapterConfig(),
        name: str = "atpt",
    ):
        super().__init__(model, detect(model, has_text=True), config, name)
        if tokenizer is None:
            raise ValueError(f"a tokenizer is needed for the class prompts: {self.backbone.tokenizer_hint}")
        generator = torch.Generator().manual_seed(config.seed or 0)
        with torch.inference_mode(False), torch.no_grad(), evaluation_mode(model):
            self.prompt = PromptLearner(
                self.backbone, classnames, tokenizer, config.context_phrase, config.n_ctx, generator
            )
            self.register_buffer(
                "zero_shot_text", self.prompt.text_features(self.prompt.initial_context), persistent=False
            )
        self.build_components()
        encode = self.backbone.encode_image
        self.view_encoder = torch.compile(encode, dynamic=True) if config.compile else encode

    @property
    def classnames(self):
        return self.prompt.classnames

    @property
    def num_outputs(self) -> int:
        return len(self.classnames)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, classes={len(self.classnames)}, config={self.config}"

    def explanation_score(self):
        """S = top-1 logit under the initial prompt (never a tuned one: no stale prompt)."""
        return top1_logit_score(self.zero_shot_text, self.backbone.logit_scale, self.backbone.logit_bias)

    def adapt_images(self, images: torch.Tensor, track_input: bool = False) -> torch.Tensor:
        """(B, C) logits, `image_batch` images at a time. Each image keeps its own views,
        prompt and optimiser state (and, for an attack that differentiates through the tuning
        step, its own BPDA step scale); batching only shares the passes."""
        path = self.config.input_gradient if track_input else "fixed_prompt"
        chunk = self.config.image_batch or (8 if self.backbone.device.type == "cuda" else 1)
        return torch.cat([self.adapt_batch(part, track_input, path) for part in images.split(chunk)])

    def adapt_batch(self, images: torch.Tensor, track_input: bool, path: str) -> torch.Tensor:
        """The loop for a few images: views, one view pass, tuned texts, a prediction each."""
        host = images.detach().float().cpu()  # one transfer for the per-image seeds
        views = self.make_view_sets(images, [self.generator_for(image) for image in host])
        features = self.encode_views(views.flatten(0, 1), track_input).unflatten(0, views.shape[:2])
        if self.config.steps == 0:
            texts = self.zero_shot_text.expand(len(images), -1, -1)
        elif path == "fixed_prompt":
            texts = self.tune(features.detach())
        else:
            texts = self.tune(features, path)
        return torch.stack([self.aggregate(*parts) for parts in zip(views, features, texts)])

    def encode_views(self, views: torch.Tensor, track_input: bool = False) -> torch.Tensor:
        """Image features of all views, once: they do not depend on the prompt."""
        with torch.set_grad_enabled(track_input), self.image_precision():
            return self.view_encoder(views)

    def aggregate(self, views: torch.Tensor, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One prediction from the views' features under the tuned text features (every
        aggregator stays differentiable w.r.t. the features when they carry gradients)."""
        scale, bias = self.backbone.logit_scale, self.backbone.logit_bias
        zero_shot_logits = scale * features @ self.zero_shot_text.t() + bias
        predictions = ViewPredictions(
            logits=scale * features @ text.t() + bias,
            features=features,
            confident=select_confident(zero_shot_logits.detach(), self.config.n_confident),
            view_maps=lambda indices: self.explain(views[indices].detach()),
            zero_shot_logits=zero_shot_logits,
            text_features=text,
            logit_scale=scale,
            logit_bias=bias,
        )
        return self.aggregator(predictions)

    def tune(self, features: torch.Tensor, path: str = "none") -> torch.Tensor:
        """Fresh context, `steps` AdamW steps on the confident views; returns tuned text features.

        features (K, D) -> (C, E); (B, K, D) -> (B, C, E) with B independent contexts: the
        loss is the sum of the images' objectives, so each context gets exactly its own
        image's gradient, and AdamW is elementwise. The confident set is re-selected under
        the current prompt at every step, as TPT does (for one step that is the initial
        prompt's set). `path` ("bpda", "exact") keeps the result differentiable w.r.t.
        `features`, for adaptive attacks (BPDA's step scale is per context).
        """
        config = self.config
        scale, bias = self.backbone.logit_scale, self.backbone.logit_bias
        objective = objective_call(self.objective)
        batched = features.dim() == 3
        features = features if batched else features.unsqueeze(0)
        initial = self.prompt.initial_context.float().expand(len(features), -1, -1)

        def loss(contexts):
            texts = self.prompt.text_features(contexts)
            logits = scale * features @ texts.transpose(1, 2) + bias
            return sum(
                objective(image_logits[select_confident(image_logits.detach(), config.n_confident)], text, scale)
                for image_logits, text in zip(logits, texts)
            )

        if path == "none":
            contexts = adamw(initial, loss, config.steps, config.lr, config.weight_decay)
            with torch.no_grad():
                texts = self.prompt.text_features(contexts)
        else:
            with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
                contexts = adamw(initial, loss, config.steps, config.lr, config.weight_decay, path=path, batched=True)
                texts = self.prompt.text_features(contexts)
        return texts if batched else texts[0]
