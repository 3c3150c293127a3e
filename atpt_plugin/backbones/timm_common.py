"""What the timm backbones share: the model's normalisation and input size, explicit
attentions, pooling with the rows it reads, and the head on top.

A timm backbone serves two uses. A timm image classifier: `classify` maps the traced
`pooled` to class logits. The trunk of an open_clip `TimmModel` tower: `projection` is
open_clip's head, and `pooled` is the tower's embedding, `projection(model.forward_head(...))`
(the trunk's own classifier head included, as open_clip runs it).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, VitTrace, detect, normalize_images, softmax_attention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REDUCTIONS = ("token", "avg", "max", "avgmax")


def is_timm_model(model) -> bool:
    """A model built by timm (its class lives in the timm package)."""
    return isinstance(model, nn.Module) and type(model).__module__.split(".")[0] == "timm"


def timm_backbone(model: nn.Module, image_size: Optional[int] = None):
    """The registered backbone for a timm image classifier: a ViT/EVA traced, a conv net for Grad-CAM."""
    return detect(model, has_text=False, image_size=image_size)


def data_config(model: nn.Module) -> dict:
    return getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}


def top1_class_score(backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """S = sum over the batch of each image's top-1 class logit (timm classifier head)."""

    def score(pooled: torch.Tensor) -> torch.Tensor:
        return backbone.classify(pooled).float().max(dim=-1).values.sum()

    return score


def timm_attention(attn: nn.Module, x: torch.Tensor):
    """timm `Attention.forward` on `x` with an explicit softmax; returns (output, probabilities)."""
    n, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out, probs = softmax_attention((q * attn.scale) @ k.transpose(-2, -1), v)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs


def latent_attention_pool(pool: nn.Module, x: torch.Tensor):
    """timm `AttentionPoolLatent` (SigLIP's "map" head) on tokens `x` -> (pooled, (N, L) weights):
    the pooling query's attention over the tokens, mean over heads (and over latents when it
    averages them). The rollout reads these as the rows the pooled output reads."""
    n, length, channels = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(n, -1, -1)).reshape(n, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
    k, v = pool.kv(x).reshape(n, length, 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = pool.q_norm(q), pool.k_norm(k)
    out, probs = softmax_attention((q * pool.scale) @ k.transpose(-2, -1), v)
    out = pool.proj_drop(pool.proj(out))
    if pool.mlp is not None:
        out = out + pool.mlp(pool.norm(out))
    weights = probs.mean(dim=1)  # (N, latents, L)
    if pool.pool == "token":
        return out[:, 0], weights[:, 0]
    return out.mean(1), weights.mean(1)


class TimmImage(Backbone):
    """What every timm backbone shares: the model, its device, dtype, normalisation and head."""

    def _setup(self, model: nn.Module, projection: Optional[nn.Module], mean, std):
        self.model = model
        self.projection = projection
        cfg = data_config(model)
        self.mean = torch.as_tensor(mean if mean is not None else cfg.get("mean") or IMAGENET_MEAN, dtype=torch.float)
        self.std = torch.as_tensor(std if std is not None else cfg.get("std") or IMAGENET_STD, dtype=torch.float)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)


class TimmTokens(TimmImage):
    """A timm token transformer (ViT, EVA): input size, pooling with its query rows, head, trace end."""

    kind = "vit"
    distilled = False

    def _setup_size(self, model: nn.Module, image_size: Optional[int]):
        """Square views at the model's input size; another size only with `dynamic_img_size=True`."""
        self.dynamic = bool(getattr(model, "dynamic_img_size", False))
        native = tuple(model.patch_embed.img_size)
        if image_size is None:
            if native[0] != native[1]:
                raise NotImplementedError(
                    f"the model's input size {native} is not square; the views are square crops: "
                    "pass image_size=... for a model created with dynamic_img_size=True"
                )
            image_size = native[0]
        elif (image_size, image_size) != native and not self.dynamic:
            raise ValueError(
                f"this model takes {native[0]}x{native[1]} images (dynamic_img_size=False); create it "
                f"with timm.create_model(..., dynamic_img_size=True) to run it at {image_size}x{image_size}"
            )
        self.native_size = native
        self.image_size = int(image_size)

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def _check_size(self, images: torch.Tensor):
        if not self.dynamic and tuple(images.shape[-2:]) != self.native_size:
            raise ValueError(
                f"this model takes {self.native_size[0]}x{self.native_size[1]} images "
                f"(dynamic_img_size=False), got {tuple(images.shape[-2:])}"
            )

    def pool_start(self, attention_pool: bool) -> int:
        """The first token row the pool reads (prefix tokens skipped or not)."""
        return 0 if self.model.pool_include_prefix else self.model.num_prefix_tokens

    def head_input(self, tokens: torch.Tensor):
        """Final (normed) tokens -> (pooled head input, query row weights or None for the class token).

        The weights say how much each token row contributes to the pooled vector: the mean
        of the pooled rows for avg, the share of channels each row is the maximum of for
        max, both tokens equally for DeiT-distilled, the pooling query's attention for
        attention pooling ("map"). The rollout reads relevance from them.
        """
        model = self.model
        n, length, _ = tokens.shape
        if self.distilled:
            cls, dist = model.head_drop(tokens[:, 0]), model.head_drop(tokens[:, 1])
            weights = tokens.new_zeros(length)
            weights[:2] = 0.5
            return torch.cat([cls, dist], dim=-1), weights
        pool = model.global_pool
        weights = tokens.new_zeros(n, length)
        if model.attn_pool is not None:
            start = self.pool_start(attention_pool=True)
            pooled, read = latent_attention_pool(model.attn_pool, tokens[:, start:])
            weights[:, start:] = read.to(weights.dtype)
        elif pool == "token":
            pooled, weights = tokens[:, 0], None
        else:
            start = self.pool_start(attention_pool=False)
            rows = tokens[:, start:]
            parts = []
            if pool in ("avg", "avgmax"):
                parts.append(rows.mean(dim=1))
                weights[:, start:] += 1.0 / rows.shape[1]
            if pool in ("max", "avgmax"):
                parts.append(rows.amax(dim=1))
                winners = F.one_hot(rows.detach().argmax(dim=1), rows.shape[1]).float().mean(dim=1)
                weights[:, start:] += winners.to(weights.dtype)
            pooled = parts[0] if len(parts) == 1 else 0.5 * (parts[0] + parts[1])
            weights = weights / len(parts)
        return model.head_drop(model.fc_norm(pooled)), weights

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """The trunk's classifier head on the head input (`forward_head` after pre-logits)."""
        model = self.model
        if self.distilled:
            cls, dist = pooled.chunk(2, dim=-1)
            return (model.head(cls) + model.head_dist(dist)) / 2
        return model.head(pooled)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Class logits from `VitTrace.pooled`, as `model.forward_head` computes them (eval mode)."""
        if self.projection is not None:
            raise ValueError("this backbone projects its features (an image tower); it has no classifier head")
        return self.head(pooled)

    def embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """A classifier's pre-logits embedding (`forward_head(..., pre_logits=True)`) from `VitTrace.pooled`."""
        if self.distilled:
            cls, dist = pooled.chunk(2, dim=-1)
            return (cls + dist) / 2
        return pooled

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of [0,1] images (the model's own fused forward), in fp32: a
        classifier's pre-logits, a tower's projected output."""
        x = self.normalize(images)
        self._check_size(x)
        features = self.model.forward_features(x)
        if self.projection is None:
            features = self.model.forward_head(features, pre_logits=True)
        else:
            features = self.projection(self.model.forward_head(features))
        return features.float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised `embed_image`."""
        return F.normalize(self.embed_image(images), dim=-1)

    def finish_trace(self, tokens: torch.Tensor, records, grid: Tuple[int, int]) -> VitTrace:
        """The final norm, the pool and (for a tower) the heads after the traced blocks."""
        pooled, weights = self.head_input(self.model.norm(tokens))
        if self.projection is not None:
            pooled = self.projection(self.head(pooled))
        return VitTrace(
            pooled.float(),
            records,
            self.model.num_prefix_tokens,
            grid,
            query_weights=None if weights is None else weights.detach().float(),
        )
