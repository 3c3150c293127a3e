"""What the Hugging Face `transformers` CLIP-style models (CLIPModel, SiglipModel) share.

Their vision and text towers are stacks of one kind of pre-norm encoder layer
(`layer_norm1`, `self_attn` with q/k/v/out projections, `layer_norm2`, `mlp`), run through
the attention implementation set on the model's config (SDPA by default), which returns no
probabilities. The model is never changed (no `attn_implementation` flag is touched):
`trace` re-runs the vision layers with the model's own submodules and an explicit softmax
attention, and the text side re-runs the text tower from word embeddings, with the mask
the model builds itself, so a learnable context can be spliced in. The families differ in
where they pool (`HfClipBackbone`, `HfSiglipBackbone`); `tests/test_families.py` checks
both against `get_image_features` / `get_text_features`.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, VitTrace, normalize_images, pre_norm_step, run_blocks, softmax_attention


def is_transformers_model(model, class_names) -> bool:
    """`model` is one of the named `transformers` classes (or a subclass), without importing
    transformers for models that do not come from it."""
    if type(model).__module__.split(".")[0] != "transformers":
        return False
    import transformers

    return isinstance(model, tuple(getattr(transformers, name) for name in class_names if hasattr(transformers, name)))


def model_output(output) -> torch.Tensor:
    """`get_image_features` / `get_text_features` give a tensor or (transformers 5) an output with
    `pooler_output`."""
    return output if torch.is_tensor(output) else output.pooler_output


def hf_attention(attn: nn.Module, x: torch.Tensor):
    """`CLIPAttention` / `SiglipAttention` on `x` with an explicit softmax; returns (output, probabilities)."""
    n, length, _ = x.shape
    q, k, v = (
        proj(x).reshape(n, length, -1, attn.head_dim).transpose(1, 2)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    out, probs = softmax_attention((q @ k.transpose(-2, -1)) * attn.scale, v)
    return attn.out_proj(out), probs


def _traced_layer(layer, x: torch.Tensor):
    return pre_norm_step(
        x, layer.layer_norm1, lambda normed: hf_attention(layer.self_attn, normed), layer.layer_norm2, layer.mlp
    )


class HfBackbone(Backbone):
    """A `transformers` dual encoder: subclasses give the layer class, the normalisation, the
    vision embedding and pooling, the text mask, pooling position and head."""

    has_text = True
    kind = "vit"
    tokenizer_hint = "tokenizer=transformers.AutoTokenizer.from_pretrained(<the model's hub id or folder>)"
    model_classes: tuple  # the transformers model classes of the family
    modeling: str  # the transformers module defining its layers
    layer_class: str
    image_mean: tuple  # what the family's image processor normalises with
    image_std: tuple
    num_prefix_tokens: int

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        return is_transformers_model(model, cls.model_classes)

    def __init__(self, model: nn.Module):
        if not self.accepts(model):
            raise TypeError(f"expected a transformers {' or '.join(self.model_classes)}, got {type(model).__name__}")
        self.model = model
        self.vision, self.text = model.vision_model, model.text_model
        layer = getattr(importlib.import_module(self.modeling), self.layer_class)
        odd = sorted({type(m).__name__ for m in self.vision.encoder.layers if type(m) is not layer})
        if odd:
            raise NotImplementedError(
                f"{type(model).__name__}'s vision tower has {', '.join(odd)} layers; the "
                f"trace re-runs {self.layer_class} layers"
            )
        config = model.config.vision_config
        self.image_size = int(config.image_size)
        side = self.image_size // config.patch_size
        self.grid_size = (side, side)
        self.mean, self.std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
        self.text_context_length = self.text.embeddings.position_embedding.num_embeddings
        pad = model.config.text_config.pad_token_id
        self.text_pad_id = 0 if pad is None else int(pad)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp().reshape(())

    @property
    def num_blocks(self) -> int:
        return len(self.vision.encoder.layers)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of [0,1] images (the model's own forward, projected), in fp32."""
        return model_output(self.model.get_image_features(pixel_values=self.normalize(images))).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of [0,1] images (the model's own forward)."""
        return F.normalize(self.embed_image(images), dim=-1)

    def trace(self, images: torch.Tensor, first_block: int = 0) -> VitTrace:
        """Vision forward recording layers >= first_block; earlier layers run without autograd."""
        with torch.no_grad():
            x = self.embed(self.normalize(images))
        x, records = run_blocks(
            self.vision.encoder.layers,
            x,
            first_block,
            _traced_layer,
            plain_step=lambda layer, tokens: layer(tokens, None),
        )
        pooled, weights = self.pool(x)
        return VitTrace(
            pooled.float(),
            records,
            self.num_prefix_tokens,
            self.grid_size,
            query_weights=None if weights is None else weights.detach().float(),
        )

    # text side ---------------------------------------------------------------
    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text.embeddings.token_embedding(ids)

    def encode_text_embeddings(self, embeddings: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features from word embeddings: positions, the model's own mask,
        the encoder, the final norm, the pooled position and the head."""
        text = self.text
        hidden = text.embeddings(inputs_embeds=embeddings)
        mask, extra = self.text_mask(hidden)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, **extra).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index]
        return F.normalize(self.text_head(pooled).float(), dim=-1)
