"""The backbone interface: what the episodic loop and the explainers read from a model family.

A backbone wraps a model without changing it. Families register here (`@BACKBONES.register`);
another package adds one under the entry-point group `atpt_plugin.backbones`. `detect`
asks each registered backbone whether it `accepts` a model: installed packages first, so
a plugin can take over a family, then the built-ins in registration order.

What every backbone gives (the loop and the explainers need nothing else):
- `image_size` (side of the square views), `device`, `dtype`, `normalize([0,1] images)`;
- `kind`: "vit" (token transformer, traced for the rollouts) or "resnet" (a feature map
  for Grad-CAM), and `default_explainer`, the explainer `explainer="auto"` picks;
- `encode_image(images) -> (N, E)` L2-normalised embeddings (CLIP towers);
- `trace(images, first_block) -> VitTrace` ("vit") or `trace_resnet(images) -> (pooled,
  feature map)` ("resnet"), activations in the autograd graph;
- `has_text`: True for CLIP models, whose text side (`logit_scale`, `text_tower`,
  `encode_text_embeddings`) the prompt learner drives; False for image classifiers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..registry import Registry

BACKBONES = Registry("backbone", "atpt_plugin.backbones")


class Backbone:
    """Base class of the model-family adapters (see the module docstring for the contract)."""

    kind: str = "vit"
    has_text: bool = False
    image_size: int

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether this family adapter is the one for `model` (it may still refuse a variant
        it cannot trace, with an error that says what is missing)."""
        raise NotImplementedError

    @property
    def default_explainer(self) -> str:
        return "token_grad_rollout" if self.kind == "vit" else "gradcam"


def detect(model: nn.Module, has_text: bool, **options) -> Backbone:
    """The registered backbone that accepts `model` (with a text tower when `has_text`)."""
    entries = BACKBONES.entries()
    builtin = [name for name in entries if entries[name].source == BACKBONES.builtin_source]
    ordered = [name for name in entries if name not in builtin] + builtin
    for name in ordered:
        family = entries[name].load()
        if family.has_text == has_text and family.accepts(model):
            return family(model, **options)
    wanted = "a CLIP model (image and text towers)" if has_text else "an image classifier"
    families = [name for name in ordered if entries[name].load().has_text == has_text]
    raise TypeError(
        f"no backbone accepts {type(model).__name__} as {wanted}; installed backbones for it: "
        f"{', '.join(families) or 'none'} (another package adds one under the entry-point group "
        f"{BACKBONES.group!r})")


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[0,1] images -> a model's input: (x - mean) / std per channel, in the model's dtype."""
    mean = mean.to(images.device, images.dtype)[:, None, None]
    std = std.to(images.device, images.dtype)[:, None, None]
    return ((images - mean) / std).to(dtype)


@dataclass
class BlockRecord:
    """One transformer block's activations, kept in the autograd graph."""

    tokens: torch.Tensor   # (N, L, D) block input T^(b)
    normed: torch.Tensor   # (N, L, D) ln_1(T^(b)), what the attention reads
    attn: torch.Tensor     # (N, heads, L, L) attention probabilities A^(b)


@dataclass
class VitTrace:
    pooled: torch.Tensor           # (N, E) image embedding (unnormalised)
    blocks: List[BlockRecord]      # records of blocks first_block..last
    num_prefix_tokens: int
    grid_size: Tuple[int, int]
    # (N, L) or (L,) weights of the token rows the pooled output reads (avg/max pooling,
    # distillation token); None: the class token's row 0 alone
    query_weights: Optional[torch.Tensor] = None


def run_blocks(blocks, x: torch.Tensor, first_block: int, traced_step):
    """Blocks before `first_block` without autograd; from there `traced_step(block, x) ->
    (x, BlockRecord)` with the input of `first_block` a fresh leaf, so a backward from the
    output stops there (the explainer never needs earlier activations)."""
    records = []
    for index, block in enumerate(blocks):
        if index < first_block:
            with torch.no_grad():
                x = block(x)
            continue
        if index == first_block:
            x = x.detach().requires_grad_(True)
        x, record = traced_step(block, x)
        records.append(record)
    return x, records
