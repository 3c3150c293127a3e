"""The model transfer attacks are made on: zero-shot CLIP with the initial prompt."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from atpt_plugin.adapter import TestTimeAdapter
from atpt_plugin.augmenters import center_view
from atpt_plugin.inputs import check_images
from atpt_plugin.presets import zeroshot


class ZeroShotClassifier(nn.Module):
    """Zero-shot CLIP with the initial prompt, batched and differentiable w.r.t. its input.

    Equal to `load_adapter("zeroshot")` (its configuration is the preset's): the center
    crop, the frozen initial prompt, no tuning. The class text
    features are computed once at construction; each forward is one image-tower pass over
    the whole batch, so PGD costs one forward and one backward per step.
    """

    def __init__(self, adapter: TestTimeAdapter):
        super().__init__()
        self.model = adapter.model  # a submodule: torchattacks finds the device from it
        self.backbone = adapter.backbone
        self.classnames = list(adapter.classnames)
        self.prompt_phrase = adapter.config.context_phrase
        self.register_buffer("text_features", adapter.zero_shot_text.detach().clone(), persistent=False)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        classnames: Sequence[str],
        tokenizer,
        domain_word: Optional[str] = None,
        ctx_init: Optional[str] = "a photo of a",
    ) -> "ZeroShotClassifier":
        config = zeroshot.config.replace(ctx_init=ctx_init, domain_word=domain_word)
        return cls(TestTimeAdapter(model, classnames, tokenizer, config, name="zeroshot"))

    @classmethod
    def from_adapter(cls, adapter: TestTimeAdapter) -> "ZeroShotClassifier":
        """The zero-shot model under `adapter`'s own initial prompt."""
        return cls(adapter)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images).to(self.backbone.device)
        views = center_view(images, self.backbone.image_size)
        features = self.backbone.encode_image(views)
        return self.backbone.logit_scale * features @ self.text_features.t() + self.backbone.logit_bias
