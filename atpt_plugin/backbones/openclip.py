"""What the episodic loop needs from an open_clip model (CLIP and CustomTextCLIP).

Image towers: open_clip's own ViT is traced here (open_clip 3.x computes attention with
`nn.MultiheadAttention(need_weights=False)`, so `trace` re-runs the block stack with the
model's own submodules and an explicit attention); a ModifiedResNet gives its last feature
map to Grad-CAM; a timm trunk (`TimmModel`: SigLIP, EVA, ConvNeXt, timm ViTs) goes to the
registered timm backbone that accepts it, with open_clip's projection head and normalisation
on top. `tests/test_backbones.py` and `tests/test_families.py` check each against
`model.encode_image`.

Text towers: open_clip's `TextTransformer` as configured: causal with EOT (argmax) or EOS
pooling (CLIP), or bidirectional with last-token pooling (SigLIP); `logit_bias` where the
model has one (SigLIP).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    BACKBONES,
    Backbone,
    VitTrace,
    detect,
    multihead_attention,
    normalize_images,
    pre_norm_step,
    run_blocks,
)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_POOLS = ("argmax", "eos", "last")


def _traced_block(block, x: torch.Tensor):
    """open_clip's ResidualAttentionBlock with the attention probabilities kept."""
    return pre_norm_step(
        x,
        block.ln_1,
        lambda normed: multihead_attention(block.attn, normed),
        block.ln_2,
        block.mlp,
        block.ls_1,
        block.ls_2,
    )


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
                f"{type(model).__name__}; for a timm image classifier wrap it with a timm backbone"
            )
        self.model = model
        self.visual = model.visual
        self.image_tower = None
        size = self.visual.image_size
        self.image_size = size if isinstance(size, int) else size[0]
        self.mean = torch.tensor(getattr(self.visual, "image_mean", None) or OPENAI_MEAN)
        self.std = torch.tensor(getattr(self.visual, "image_std", None) or OPENAI_STD)
        if isinstance(self.visual, TimmModel):
            # the trunk's own backbone, with open_clip's head: embedding = head(trunk.forward_head(features))
            try:
                self.image_tower = detect(
                    self.visual.trunk,
                    has_text=False,
                    image_size=self.image_size,
                    projection=self.visual.head,
                    mean=self.mean,
                    std=self.std,
                )
                self.kind = self.image_tower.kind
            except NotImplementedError as error:
                self.kind, self.unexplained = "none", f"open_clip timm trunk: {error}"
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
                self.kind, self.unexplained = (
                    "none",
                    (
                        f"this open_clip ViT uses {', '.join(unsupported)}; the attention explainers "
                        "support class-token ViTs with standard blocks (e.g. ViT-B-16, ViT-B-32)"
                    ),
                )
        elif isinstance(self.visual, ModifiedResNet):
            self.kind = "resnet"
        else:
            self.kind, self.unexplained = (
                "none",
                (
                    f"open_clip image tower {type(self.visual).__name__} cannot be explained; the explainers "
                    "read a ViT (VisionTransformer), timm trunk (TimmModel) or ResNet (ModifiedResNet) tower"
                ),
            )
        self._check_text_tower()

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
    def logit_bias(self):
        bias = getattr(self.model, "logit_bias", None)
        return 0.0 if bias is None else bias.detach()

    @property
    def num_blocks(self) -> int:
        if self.image_tower is not None:
            return self.image_tower.num_blocks
        return len(self.visual.transformer.resblocks) if self.kind == "vit" else 0

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize_images(images, self.mean, self.std, self.dtype)

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised embeddings of [0,1] images (after the visual projection), in fp32."""
        return self.model.encode_image(self.normalize(images)).float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of [0,1] images."""
        return F.normalize(self.embed_image(images), dim=-1)

    def trace(self, images: torch.Tensor, first_block: int = 0) -> VitTrace:
        """ViT forward recording blocks >= first_block; earlier blocks run without autograd."""
        if self.kind != "vit":
            raise NotImplementedError(self.unexplained or "a ResNet tower has no attention to trace; use Grad-CAM")
        if self.image_tower is not None:
            return self.image_tower.trace(images, first_block)
        visual = self.visual
        with torch.no_grad():
            x = visual._embeds(self.normalize(images))
        x, records = run_blocks(visual.transformer.resblocks, x, first_block, _traced_block)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return VitTrace(pooled.float(), records, 1, tuple(visual.grid_size))

    def trace_resnet(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(embedding, last-stage feature map) of a ModifiedResNet or timm conv trunk, map in the graph."""
        if self.kind != "resnet":
            raise NotImplementedError(self.unexplained or "a ViT tower has no feature map; use an attention rollout")
        if self.image_tower is not None:
            return self.image_tower.trace_resnet(images)
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

    def _check_text_tower(self):
        tower = self.text_tower
        if not hasattr(tower, "token_embedding"):
            raise NotImplementedError(
                f"open_clip text tower {type(tower).__name__} (a Hugging Face text encoder) is not supported; "
                "prompt tuning drives open_clip's TextTransformer (CLIP, SigLIP, EVA-CLIP text towers)"
            )
        self.text_pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        unsupported = []
        if self.text_pool_type not in TEXT_POOLS:
            unsupported.append(f"text pooling {self.text_pool_type!r}")
        if getattr(tower, "cls_emb", None) is not None:
            unsupported.append("a text class token (CoCa)")
        if getattr(tower, "use_pad_mask", False):
            unsupported.append("padding masks")
        if unsupported:
            raise NotImplementedError(
                f"this open_clip text tower uses {', '.join(unsupported)}; prompt tuning supports EOT/EOS-pooled "
                "causal towers (CLIP) and last-token bidirectional ones (SigLIP)"
            )
        self.text_causal = tower.attn_mask is not None
        self.text_context_length = tower.positional_embedding.shape[0]
        self.text_pad_id = getattr(tower, "pad_id", 0)
        self.text_eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_tower.token_embedding(ids)

    def text_pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Where `text_global_pool` reads each prompt: EOT (highest id), first EOS, or the last position."""
        if self.text_pool_type == "argmax":
            return ids.argmax(dim=-1)
        if self.text_pool_type == "eos":
            return (ids == self.text_eos_id).int().argmax(dim=-1)
        return torch.full((len(ids),), ids.shape[1] - 1, dtype=torch.long)

    def encode_text_embeddings(self, embeddings: torch.Tensor, pool_index: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features from token embeddings (prompt already spliced in)."""
        tower = self.text_tower
        length = embeddings.shape[1]
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = embeddings + tower.positional_embedding[:length].to(embeddings.dtype)
        x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), pool_index]
        projection = tower.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, nn.Linear) else x @ projection
        return F.normalize(x.float(), dim=-1)
