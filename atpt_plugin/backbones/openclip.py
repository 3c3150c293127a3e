"""What the episodic loop needs from an open_clip CLIP image tower.

open_clip 3.x computes attention with `nn.MultiheadAttention(need_weights=False)`, so the
probabilities are never materialised. Rather than patching the library, `trace` re-runs
the ViT block stack with the model's own submodules and an explicit attention, recording
per block the input tokens, the tokens the attention reads (after `ln_1`) and the
attention probabilities. `tests/test_backbones.py` checks that it reproduces
`model.visual(x)` exactly.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import BACKBONES, Backbone, BlockRecord, VitTrace, normalize_images, run_blocks
from .timm_vit import TimmVitBackbone

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _multihead_attention(attn: nn.MultiheadAttention, x: torch.Tensor):
    """Self-attention of `attn` on batch-first `x`, returning output and probabilities."""
    n, length, dim = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(n, length, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-2, -1) * (dim // heads) ** -0.5, dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(n, length, dim)
    return attn.out_proj(out), probs


def _traced_block(block, x: torch.Tensor):
    """open_clip's ResidualAttentionBlock with the attention probabilities kept."""
    normed = block.ln_1(x)
    attended, probs = _multihead_attention(block.attn, normed)
    record = BlockRecord(tokens=x, normed=normed, attn=probs)
    x = x + block.ls_1(attended)
    return x + block.ls_2(block.mlp(block.ln_2(x))), record


@BACKBONES.register("open_clip")
class OpenClipBackbone(Backbone):
    """open_clip CLIP / CustomTextCLIP: ViT, ModifiedResNet and timm-trunk image towers."""

    has_text = True

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        import open_clip
        return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))

    def __init__(self, model: nn.Module):
        from open_clip.modified_resnet import ModifiedResNet
        from open_clip.timm_model import TimmModel
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        if not self.accepts(model):
            raise TypeError(
                f"expected an open_clip CLIP model (open_clip.create_model(...)), got "
                f"{type(model).__name__}; for a timm image classifier wrap it with a timm backbone")
        self.model = model
        self.visual = model.visual
        self.timm_tower = None
        size = self.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(getattr(self.visual, "image_mean", None) or OPENAI_MEAN)
        self.std = torch.tensor(getattr(self.visual, "image_std", None) or OPENAI_STD)
        if isinstance(self.visual, TimmModel):
            self.kind = "vit"  # traced through its timm trunk and open_clip's projection head
            self.timm_tower = TimmVitBackbone(self.visual.trunk, self.image_size, self.visual.head,
                                              self.mean, self.std)
        elif isinstance(self.visual, VisionTransformer):
            self.kind = "vit"
            unsupported = []
            if self.visual.attn_pool is not None:
                unsupported.append("attentional pooling")
            if self.visual.pool_type != "tok":
                unsupported.append(f"pool_type={self.visual.pool_type!r}")
            if not all(type(b) is ResidualAttentionBlock for b in self.visual.transformer.resblocks):
                unsupported.append("custom attention blocks")
            if unsupported:
                raise NotImplementedError(
                    f"this open_clip ViT uses {', '.join(unsupported)}; the attention explainers "
                    "support class-token ViTs with standard blocks (e.g. ViT-B-16, ViT-B-32)")
        elif isinstance(self.visual, ModifiedResNet):
            self.kind = "resnet"
        else:
            raise NotImplementedError(
                f"open_clip image tower {type(self.visual).__name__} is not supported; "
                "use a ViT (VisionTransformer), timm ViT (TimmModel) or ResNet (ModifiedResNet) tower")

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().exp()

    @property
    def num_blocks(self) -> int:
        if self.timm_tower is not None:
            return self.timm_tower.num_blocks
        return len(self.visual.transformer.resblocks) if self.kind == "vit" else 0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of [0,1] images."""
        return F.normalize(self.model.encode_image(self.normalize(images)).float(), dim=-1)

    def trace(self, images: torch.Tensor, first_block: int = 0) -> VitTrace:
        """ViT forward recording blocks >= first_block; earlier blocks run without autograd."""
        if self.timm_tower is not None:
            return self.timm_tower.trace(images, first_block)
        visual = self.visual
        with torch.no_grad():
            x = visual._embeds(self.normalize(images))
        x, records = run_blocks(visual.transformer.resblocks, x, first_block, _traced_block)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return VitTrace(pooled.float(), records, 1, tuple(visual.grid_size))

    def trace_resnet(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(embedding, last-stage feature map) of a ModifiedResNet, map in the graph."""
        visual = self.visual
        with torch.no_grad():
            x = visual.stem(self.normalize(images))
            x = visual.layer3(visual.layer2(visual.layer1(x)))
        feature_map = visual.layer4(x.detach().requires_grad_(True))
        return visual.attnpool(feature_map).float(), feature_map

    # text side ---------------------------------------------------------------
    @property
    def text_tower(self) -> nn.Module:
        """CLIP keeps the text modules on the model, CustomTextCLIP under `.text`."""
        return getattr(self.model, "text", self.model)

    def encode_text_embeddings(self, embeddings: torch.Tensor, eot: torch.Tensor,
                               attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """L2-normalised text features from token embeddings (prompt already spliced in)."""
        tower = self.text_tower
        length = embeddings.shape[1]
        x = embeddings + tower.positional_embedding[:length].to(embeddings.dtype)
        x = tower.transformer(x, attn_mask=attn_mask)
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)
