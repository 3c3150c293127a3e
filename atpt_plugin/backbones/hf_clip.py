"""Hugging Face `transformers.CLIPModel`: class-token vision tower, causal EOS-pooled text tower.

Vision: `pre_layrnorm(embeddings)`, the encoder layers (traced), `post_layernorm` of the class
token and `visual_projection`; the rollout reads the class token's row. Text: word embeddings
plus positions, the model's causal mask, `final_layer_norm`, the first EOS position (or the
highest id for configs with the legacy `eos_token_id=2`, as `CLIPTextModel` does) and
`text_projection`. Images are normalised with OpenAI CLIP's mean and std (the
`CLIPImageProcessor` default).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BACKBONES
from .hf_common import HfBackbone
from .openclip import OPENAI_MEAN, OPENAI_STD


@BACKBONES.register("hf_clip")
class HfClipBackbone(HfBackbone):
    """transformers CLIPModel."""

    model_classes = ("CLIPModel",)
    modeling = "transformers.models.clip.modeling_clip"
    layer_class = "CLIPEncoderLayer"
    image_mean, image_std = OPENAI_MEAN, OPENAI_STD
    num_prefix_tokens = 1
    text_causal = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.eos_token_id = self.text.eos_token_id

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision.pre_layrnorm(self.vision.embeddings(x))

    def pool(self, tokens: torch.Tensor):
        return self.model.visual_projection(self.vision.post_layernorm(tokens[:, 0])), None

    def text_pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        if self.eos_token_id == 2:  # configs from before transformers PR #24773: EOT is the highest id
            return ids.argmax(dim=-1)
        return (ids == self.eos_token_id).int().argmax(dim=-1)

    def text_mask(self, hidden: torch.Tensor):
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(
            config=self.text.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None
        )
        return mask, {"is_causal": True}

    def text_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.model.text_projection(pooled)
