"""Hugging Face `transformers.SiglipModel`: attention-pooled vision tower, bidirectional
last-token text tower, logits `exp(logit_scale) * cos + logit_bias`.

Vision: `embeddings` (no class token), the encoder layers (traced), `post_layernorm` of every
token, then the multihead attention-pooling head: a learnt probe attends to the tokens
(`nn.MultiheadAttention`, re-run explicitly), followed by its residual MLP. The rollout
reads the probe's attention over the tokens, mean over heads, as the row the pooled output
reads (README, "Choices"). Text: word embeddings plus positions, no causal mask, the full
padded length (padding to the model's fixed length, as SigLIP was trained), the last
position and `head`. Images are normalised with mean = std = 0.5 (`SiglipImageProcessor`).
`Siglip2Model` is refused: its vision tower reads NaFlex patch sequences, not images.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import BACKBONES, multihead_attention
from .hf_common import HfBackbone


@BACKBONES.register("hf_siglip")
class HfSiglipBackbone(HfBackbone):
    """transformers SiglipModel."""

    model_classes = ("SiglipModel", "Siglip2Model")
    modeling = "transformers.models.siglip.modeling_siglip"
    layer_class = "SiglipEncoderLayer"
    image_mean = image_std = (0.5, 0.5, 0.5)
    num_prefix_tokens = 0
    text_causal = False

    def __init__(self, model: nn.Module):
        if type(model).__name__.startswith("Siglip2"):
            raise NotImplementedError(
                f"{type(model).__name__}'s vision tower reads NaFlex patch sequences (pixel_values as patches with "
                "spatial_shapes and a pixel mask), not square images; use SiglipModel, or open_clip's "
                "ViT-*-SigLIP2 models (timm trunk), which are supported"
            )
        super().__init__(model)
        if not self.vision.use_head:
            raise NotImplementedError(
                "this SiglipModel has no vision pooling head (vision_use_head=False): "
                "it gives no image embedding to compare with the text"
            )

    @property
    def logit_bias(self) -> torch.Tensor:
        return self.model.logit_bias.detach().reshape(())

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision.embeddings(x)

    def pool(self, tokens: torch.Tensor):
        """The pooling head on the normed tokens, with the probe's attention (mean over heads)."""
        head = self.vision.head
        tokens = self.vision.post_layernorm(tokens)
        probe = head.probe.expand(tokens.shape[0], -1, -1)
        attended, probs = multihead_attention(head.attention, probe, tokens)
        pooled = attended + head.mlp(head.layernorm(attended))
        return pooled[:, 0], probs.mean(dim=1)[:, 0]

    def text_pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.long)

    def text_mask(self, hidden: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.text.config, inputs_embeds=hidden, attention_mask=None), {}

    def text_head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.text.head(pooled)
