"""What the episodic loop needs from a timm image model: ViTs traced, conv nets for Grad-CAM.

timm's `Attention` computes attention with fused SDPA unless `fused_attn` is off, so the
probabilities are never materialised. Rather than flipping that flag (or editing timm),
`TimmVitBackbone.trace` re-runs the block stack with the model's own submodules (`norm1`,
`attn.qkv`, `q_norm`, `k_norm`, `attn.norm`, `proj`, `ls1`, `drop_path1`, `mlp`, ...) and
an explicit softmax attention, recording per block the input tokens, the tokens the
attention reads and the attention probabilities. The model is only read: no flag,
parameter, hook or mode is changed. `tests/test_timm.py` checks the traced output against
`model.forward_head(model.forward_features(x), pre_logits=True)` and the probabilities
against timm's own unfused path.

Covered: timm `VisionTransformer` and its subclasses with standard pre-norm (`Block`) or
post-norm (`ResPostBlock`) blocks and `Attention` layers: class token, DeiT's distillation
token (`VisionTransformerDistilled`), register tokens, `global_pool` in token / avg / max /
avgmax (with or without `pool_include_prefix`), `fc_norm`, `pre_norm`, `no_embed_class`,
qk-norm, layer scale, and `dynamic_img_size`. Not covered (clear error): attention pooling
('map', 'prr'), no pooling (''), parallel blocks, differential attention, other timm
transformer families (Swin, EVA, BEiT, ...). Convolutional timm models get
`TimmCnnBackbone`, which feeds the Grad-CAM explainer.

The score of a plain classifier is computed from `VitTrace.pooled` with `classify`: for
a ViT `pooled` is what the classifier head reads (`forward_head(..., pre_logits=True)`),
for DeiT-distilled the class and distillation tokens side by side (its two heads read
one each).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import BACKBONES, Backbone, BlockRecord, VitTrace, detect, normalize_images, run_blocks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POOLS = ("token", "avg", "max", "avgmax")


def is_timm_model(model) -> bool:
    """A model built by timm (its class lives in the timm package)."""
    return isinstance(model, nn.Module) and type(model).__module__.split(".")[0] == "timm"


def timm_backbone(model: nn.Module, image_size: Optional[int] = None):
    """The registered backbone for a timm image classifier: a ViT traced, a conv net for Grad-CAM."""
    return detect(model, has_text=False, image_size=image_size)


def _data_config(model: nn.Module) -> dict:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return cfg


def _mean_std(model: nn.Module):
    cfg = _data_config(model)
    return torch.tensor(cfg.get("mean") or IMAGENET_MEAN), torch.tensor(cfg.get("std") or IMAGENET_STD)


def _attention(attn: nn.Module, x: torch.Tensor):
    """timm `Attention.forward` on `x` with an explicit softmax; returns (output, probabilities)."""
    n, length, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    attn_dim = getattr(attn, "attn_dim", heads * head_dim)
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(n, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(n, length, attn_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs


class _TimmImage(Backbone):
    """What every timm backbone shares: the model, its device, dtype and normalisation."""

    model: nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)


@BACKBONES.register("timm_vit")
class TimmVitBackbone(_TimmImage):
    """Image access to a timm `VisionTransformer` (never modified).

    `image_size` is the side of the square views; it defaults to the model's input size
    and may differ only for models created with `dynamic_img_size=True`.
    `projection` (optional module) maps the head input to the embedding the score reads,
    e.g. the projection of an open_clip `TimmModel` tower (`visual.head` over `visual.trunk`);
    `mean` and `std` override the model's pretrained normalisation (open_clip's own).
    """

    kind = "vit"

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer
        return isinstance(model, VisionTransformer)

    def __init__(self, model: nn.Module, image_size: Optional[int] = None,
                 projection: Optional[nn.Module] = None, mean=None, std=None):
        from timm.models.vision_transformer import Attention, Block, ResPostBlock, VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        self.model = model
        self.projection = projection
        self.distilled = getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist")
        unsupported = []
        if getattr(model, "attn_pool", None) is not None or model.global_pool in ("map", "prr"):
            unsupported.append(f"attention pooling (global_pool={model.global_pool!r})")
        elif not self.distilled and model.global_pool not in POOLS:
            unsupported.append(f"global_pool={model.global_pool!r} (no pooled features)")
        expected_head = _distilled_forward_head() if self.distilled else VisionTransformer.forward_head
        if (type(model).forward_head is not expected_head or type(model).pool is not VisionTransformer.pool
                or type(model).forward_features is not VisionTransformer.forward_features):
            unsupported.append(f"its own forward_features/pool/forward_head ({type(model).__name__})")
        blocks = set(type(b) for b in model.blocks) - {Block, ResPostBlock}
        if blocks:
            unsupported.append(f"{', '.join(sorted(t.__name__ for t in blocks))} blocks")
        elif any(type(b.attn) is not Attention for b in model.blocks):
            names = sorted({type(b.attn).__name__ for b in model.blocks} - {"Attention"})
            unsupported.append(f"{', '.join(names)} attention")
        if unsupported:
            raise NotImplementedError(
                f"this timm ViT ({type(model).__name__}) uses {'; '.join(unsupported)}; the attention "
                "explainers support ViTs with standard Block/ResPostBlock blocks and timm Attention, "
                "pooled by class token (+ distillation token), avg, max or avgmax")
        self.dynamic = bool(getattr(model, "dynamic_img_size", False))
        native = tuple(model.patch_embed.img_size)
        if image_size is None:
            if native[0] != native[1]:
                raise NotImplementedError(
                    f"the model's input size {native} is not square; the views are square crops: "
                    "pass image_size=... for a model created with dynamic_img_size=True")
            image_size = native[0]
        elif (image_size, image_size) != native and not self.dynamic:
            raise ValueError(
                f"this model takes {native[0]}x{native[1]} images (dynamic_img_size=False); create it "
                f"with timm.create_model(..., dynamic_img_size=True) to run it at {image_size}x{image_size}")
        self.native_size = native
        self.image_size = int(image_size)
        self.mean, self.std = _mean_std(model)
        if mean is not None:
            self.mean = torch.as_tensor(mean, dtype=torch.float)
        if std is not None:
            self.std = torch.as_tensor(std, dtype=torch.float)

    @property
    def num_blocks(self) -> int:
        return len(self.model.blocks)

    def _check_size(self, images: torch.Tensor):
        if not self.dynamic and tuple(images.shape[-2:]) != self.native_size:
            raise ValueError(
                f"this model takes {self.native_size[0]}x{self.native_size[1]} images "
                f"(dynamic_img_size=False), got {tuple(images.shape[-2:])}")

    # the forward, piece by piece ------------------------------------------------
    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Normalised images -> (tokens entering block 0, patch grid), the model's own embedding."""
        model = self.model
        self._check_size(x)
        x = model.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(model.patch_embed.grid_size)
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        if x.shape[1] - model.num_prefix_tokens != grid[0] * grid[1]:
            raise NotImplementedError(f"{x.shape[1]} tokens do not make {model.num_prefix_tokens} prefix "
                                      f"tokens and a {grid} patch grid")
        return x, grid

    def head_input(self, tokens: torch.Tensor):
        """Final (normed) tokens -> (pooled head input, query row weights or None for the class token).

        The weights say how much each token row contributes to the pooled vector: the mean
        of the pooled rows for avg, the share of channels each row is the maximum of for
        max, both tokens equally for DeiT-distilled. The rollout reads relevance from them.
        """
        model = self.model
        prefix = model.num_prefix_tokens
        n, length, _ = tokens.shape
        if self.distilled:
            cls, dist = model.head_drop(tokens[:, 0]), model.head_drop(tokens[:, 1])
            weights = tokens.new_zeros(length)
            weights[:2] = 0.5
            return torch.cat([cls, dist], dim=-1), weights
        pool = model.global_pool
        if pool == "token":
            pooled, weights = tokens[:, 0], None
        else:
            start = 0 if model.pool_include_prefix else prefix
            rows = tokens[:, start:]
            parts, weights = [], tokens.new_zeros(n, length)
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

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Class logits from `VitTrace.pooled`, as `model.forward_head` computes them (eval mode)."""
        if self.projection is not None:
            raise ValueError("this backbone projects its features (an image tower); it has no classifier head")
        model = self.model
        if self.distilled:
            cls, dist = pooled.chunk(2, dim=-1)
            return (model.head(cls) + model.head_dist(dist)) / 2
        return model.head(pooled)

    def embedding(self, pooled: torch.Tensor) -> torch.Tensor:
        """The image embedding (`forward_head(..., pre_logits=True)`, projected) from `VitTrace.pooled`."""
        if self.distilled:
            cls, dist = pooled.chunk(2, dim=-1)
            pooled = (cls + dist) / 2
        return pooled if self.projection is None else self.projection(pooled)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised pre-logits embeddings of [0,1] images (the model's own fused forward)."""
        x = self.normalize(images)
        self._check_size(x)
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        if self.projection is not None:
            features = self.projection(features)
        return F.normalize(features.float(), dim=-1)

    def trace(self, images: torch.Tensor, first_block: int = 0) -> VitTrace:
        """ViT forward recording blocks >= first_block; earlier blocks run without autograd."""
        model = self.model
        with torch.no_grad():
            x, grid = self.embed(self.normalize(images))
        x, records = run_blocks(model.blocks, x, first_block, _traced_block)
        pooled, weights = self.head_input(model.norm(x))
        if self.projection is not None:
            pooled = self.projection(pooled)
        return VitTrace(pooled.float(), records, model.num_prefix_tokens, grid,
                        query_weights=None if weights is None else weights.detach().float())


def _traced_block(block, x: torch.Tensor):
    """timm's Block (pre-norm) or ResPostBlock (post-norm) with the attention probabilities kept."""
    from timm.models.vision_transformer import ResPostBlock

    if type(block) is ResPostBlock:
        attended, probs = _attention(block.attn, x)
        record = BlockRecord(tokens=x, normed=x, attn=probs)
        x = x + block.drop_path1(block.norm1(attended))
        return x + block.drop_path2(block.norm2(block.mlp(x))), record
    normed = block.norm1(x)
    attended, probs = _attention(block.attn, normed)
    record = BlockRecord(tokens=x, normed=normed, attn=probs)
    x = x + block.drop_path1(block.ls1(attended))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x)))), record


def _distilled_forward_head():
    from timm.models.deit import VisionTransformerDistilled
    return VisionTransformerDistilled.forward_head


@BACKBONES.register("timm_cnn")
class TimmCnnBackbone(_TimmImage):
    """A timm conv net for Grad-CAM on its last feature map (`forward_features`, NCHW).

    `kind` is "resnet" because that is the tower kind the Grad-CAM explainer takes; the
    attention explainers need a ViT. `trace_resnet` returns the feature map twice: it is
    what the classifier head reads (`classify` = `model.forward_head`) and what Grad-CAM
    weights.
    """

    kind = "resnet"
    num_blocks = 0

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        """Any other timm model; token transformers outside the ViT class are refused when built."""
        return is_timm_model(model)

    def __init__(self, model: nn.Module, image_size: Optional[int] = None):
        if hasattr(model, "num_prefix_tokens"):  # a token-based transformer outside the ViT family
            raise NotImplementedError(
                f"timm {type(model).__name__} is a token transformer outside timm's VisionTransformer class: "
                "the attention explainers cover VisionTransformer and its subclasses (ViT, DeiT, DeiT-III, "
                "register and hybrid ViTs, ...), the Grad-CAM fallback covers conv nets (NCHW feature maps)")
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise NotImplementedError(
                f"{type(model).__name__} has no forward_features/forward_head; the Grad-CAM fallback "
                "needs a timm model that exposes them")
        fmt = getattr(model, "output_fmt", "NCHW")
        if fmt != "NCHW":
            raise NotImplementedError(
                f"{type(model).__name__} returns {fmt} features; the Grad-CAM fallback takes conv nets "
                "with NCHW feature maps, the attention explainers timm VisionTransformers")
        self.model = model
        if image_size is None:
            size = _data_config(model).get("input_size", (3, 224, 224))[-2:]
            image_size = size[0]
        self.image_size = int(image_size)
        self.mean, self.std = _mean_std(model)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        channels = getattr(self.model, "num_features", None)
        if features.dim() != 4 or (channels is not None and features.shape[1] != channels):
            raise NotImplementedError(
                f"{type(self.model).__name__}.forward_features gave shape {tuple(features.shape)}, not an "
                f"(N, {channels}, h, w) feature map; Grad-CAM needs a conv net")
        return features

    def classify(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feature_map)

    def trace_resnet(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = self.feature_map(self.normalize(images))
        features = features.detach().requires_grad_(True)
        return features, features

    def trace(self, images: torch.Tensor, first_block: int = 0):
        raise NotImplementedError(
            f"{type(self.model).__name__} is not a ViT: the attention rollouts need a timm "
            "VisionTransformer; use explainer='gradcam' (or 'auto')")


def top1_class_score(backbone) -> Callable[[torch.Tensor], torch.Tensor]:
    """S = sum over the batch of each image's top-1 class logit (timm classifier head)."""
    def score(pooled: torch.Tensor) -> torch.Tensor:
        return backbone.classify(pooled).float().max(dim=-1).values.sum()
    return score
