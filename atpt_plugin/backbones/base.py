"""The backbone interface: what the episodic loop and the explainers read from a model family.

A backbone wraps a model without changing it. Families register here (`@BACKBONES.register`);
another package adds one under the entry-point group `atpt_plugin.backbones`. `detect`
asks each registered backbone whether it `accepts` a model: installed packages first, so
a plugin can take over a family, then the built-ins in registration order.

What every backbone gives (the loop and the explainers need nothing else):
- `image_size` (side of the square views), `device`, `dtype`, `normalize([0,1] images)`;
- `kind`: "vit" (token transformer, traced for the rollouts), "resnet" (a feature map
  for Grad-CAM) or "none" (a tower no explainer reads: `unexplained` says why; the
  adapters without an explainer still run), and `default_explainer`, the explainer
  `explainer="auto"` picks;
- `encode_image(images) -> (N, E)` L2-normalised embeddings (CLIP towers), and
  `embed_image(images)` the same before the normalisation (read by input defences: TTC);
- `trace(images, first_block) -> VitTrace` ("vit") or `trace_resnet(images) -> (pooled,
  feature map)` ("resnet"), activations in the autograd graph;
- `has_text`: True for CLIP models, False for image classifiers.

The text side of a CLIP backbone (`has_text`), which the prompt learner drives without
knowing the family:
- `logit_scale` and `logit_bias` (0 for CLIP, SigLIP's learnt bias): logits are
  `logit_scale * cos + logit_bias`;
- `tokenize(tokenizer, texts) -> (N, text_context_length)` ids as the model reads them
  (open_clip-style tokenizers returning a tensor, or `transformers` tokenizers returning
  `input_ids`; right-padded with `text_pad_id`);
- `text_pool_index(ids) -> (N,)` the position whose final state is the text feature (CLIP's
  EOS, SigLIP's last position), and `text_causal`: with a causal mask every token after the
  last pooled one can be cut without changing a feature;
- `token_embedding(ids) -> (N, L, D)` word embeddings, and `encode_text_embeddings(embeddings,
  pool_index) -> (N, E)` L2-normalised features from word embeddings (positions, mask, blocks,
  final norm, pooling and projection as the model's own text forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

BACKBONES = Registry("backbone", "atpt_plugin.backbones")


class Backbone:
    """Base class of the model-family adapters (see the module docstring for the contract)."""

    kind: str = "vit"
    unexplained: Optional[str] = None
    has_text: bool = False
    fallback: bool = False  # a catch-all family, asked after every other one
    image_size: int
    logit_bias = 0.0
    text_causal: bool = True
    text_context_length: int
    text_pad_id: int = 0

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Whether this family adapter is the one for `model` (it may still refuse a variant
        it cannot trace, with an error that says what is missing)."""
        raise NotImplementedError

    tokenizer_hint = "tokenizer=open_clip.get_tokenizer(<model name>)"  # how users get this family's tokenizer

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, E) unnormalised image embeddings; a family that gives them overrides this."""
        raise NotImplementedError(
            f"the {type(self).__name__} backbone gives no unnormalised image embedding (embed_image), "
            "which an input defence such as ttc reads: use input_defence=None with this model"
        )

    @property
    def default_explainer(self) -> str:
        return "token_grad_rollout" if self.kind == "vit" else "gradcam"

    def tokenize(self, tokenizer, texts) -> torch.Tensor:
        """Padded with the tokenizer's own pad token where it names one (what the model was fed)."""
        from .text import token_ids

        pad = getattr(tokenizer, "pad_token_id", None)
        return token_ids(tokenizer, texts, self.text_context_length, self.text_pad_id if pad is None else pad)


def detect(model: nn.Module, has_text: bool, **options) -> Backbone:
    """The registered backbone that accepts `model` (with a text tower when `has_text`)."""
    entries = BACKBONES.entries()
    builtin = [name for name in entries if entries[name].source == BACKBONES.builtin_source]
    ordered = [name for name in entries if name not in builtin] + builtin
    ordered.sort(key=lambda name: getattr(entries[name].load(), "fallback", False))  # stable: catch-alls last
    for name in ordered:
        family = entries[name].load()
        if family.has_text == has_text and family.accepts(model):
            return family(model, **options)
    wanted = "a CLIP model (image and text towers)" if has_text else "an image classifier"
    families = [name for name in ordered if entries[name].load().has_text == has_text]
    raise TypeError(
        f"no backbone accepts {type(model).__name__} as {wanted}; installed backbones for it: "
        f"{', '.join(families) or 'none'} (another package adds one under the entry-point group "
        f"{BACKBONES.group!r})"
    )


def normalize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[0,1] images -> a model's input: (x - mean) / std per channel, in the model's dtype."""
    mean = mean.to(images.device, images.dtype)[:, None, None]
    std = std.to(images.device, images.dtype)[:, None, None]
    return ((images - mean) / std).to(dtype)


@dataclass
class BlockRecord:
    """One transformer block's activations, kept in the autograd graph."""

    tokens: torch.Tensor  # (N, L, D) block input T^(b)
    normed: torch.Tensor  # (N, L, D) ln_1(T^(b)), what the attention reads
    attn: torch.Tensor  # (N, heads, L, L) attention probabilities A^(b)


@dataclass
class VitTrace:
    pooled: torch.Tensor  # (N, E) image embedding (unnormalised)
    blocks: List[BlockRecord]  # records of blocks first_block..last
    num_prefix_tokens: int
    grid_size: Tuple[int, int]
    # (N, L) or (L,) weights of the token rows the pooled output reads (avg/max pooling,
    # distillation token, an attention-pooling query); None: the class token's row 0 alone
    query_weights: Optional[torch.Tensor] = None


def run_blocks(blocks, x: torch.Tensor, first_block: int, traced_step, plain_step=None):
    """Blocks before `first_block` without autograd; from there `traced_step(block, x) ->
    (x, BlockRecord)` with the input of `first_block` a fresh leaf, so a backward from the
    output stops there (the explainer never needs earlier activations). `plain_step(block, x)`
    runs an untraced block (default `block(x)`)."""
    records = []
    for index, block in enumerate(blocks):
        if index < first_block:
            with torch.no_grad():
                x = plain_step(block, x) if plain_step is not None else block(x)
            continue
        if index == first_block:
            x = x.detach().requires_grad_(True)
        x, record = traced_step(block, x)
        records.append(record)
    return x, records


# tracing helpers shared by the families ---------------------------------------------------
# The libraries compute attention with fused kernels that never return probabilities, so the
# traces re-run each block with the model's own submodules and these explicit attentions.


def softmax_attention(scores: torch.Tensor, values: torch.Tensor):
    """(N, heads, Lq, Lk) scores, (N, heads, Lk, d) values -> ((N, Lq, heads*d) output, probabilities)."""
    probs = scores.softmax(dim=-1)
    return (probs @ values).transpose(1, 2).flatten(2), probs


def multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, source: Optional[torch.Tensor] = None):
    """A batch-first `nn.MultiheadAttention` with its probabilities: self-attention of `query`,
    or `query` attending to `source` (an attention-pooling probe)."""
    n, _, dim = query.shape
    if source is None:
        q, k, v = F.linear(query, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    else:
        weight_q, weight_kv = attn.in_proj_weight.split([dim, 2 * dim])
        bias_q, bias_kv = attn.in_proj_bias.split([dim, 2 * dim]) if attn.in_proj_bias is not None else (None, None)
        q = F.linear(query, weight_q, bias_q)
        k, v = F.linear(source, weight_kv, bias_kv).chunk(2, dim=-1)
    heads = attn.num_heads
    q, k, v = (t.reshape(n, -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    out, probs = softmax_attention(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, v)
    return attn.out_proj(out), probs


def identity(x):
    return x


def pre_norm_step(x: torch.Tensor, norm1, attend: Callable, norm2, mlp, attn_out=identity, mlp_out=identity):
    """A pre-norm block `x + attn_out(attend(norm1(x))); x + mlp_out(mlp(norm2(x)))`, recording
    its input, the normed tokens the attention reads and the attention probabilities."""
    normed = norm1(x)
    attended, probs = attend(normed)
    record = BlockRecord(tokens=x, normed=normed, attn=probs)
    x = x + attn_out(attended)
    return x + mlp_out(mlp(norm2(x))), record
