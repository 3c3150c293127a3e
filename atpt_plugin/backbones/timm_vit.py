"""What the episodic loop needs from a timm `VisionTransformer`: its block stack traced.

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
avgmax (with or without `pool_include_prefix`), attention pooling ("map", SigLIP's head),
`fc_norm`, `pre_norm`, `no_embed_class`, qk-norm, layer scale, and `dynamic_img_size`. Not
covered (clear error): 'prr' pooling, no pooling (''), parallel blocks, differential
attention; EVA has its own backbone (`timm_eva.py`), other token transformers (Swin, BEiT,
...) are refused, conv nets go to Grad-CAM (`timm_cnn.py`).

The score of a plain classifier is computed from `VitTrace.pooled` with `classify`: for
a ViT `pooled` is what the classifier head reads (`forward_head(..., pre_logits=True)`),
for DeiT-distilled the class and distillation tokens side by side (its two heads read
one each).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .base import BACKBONES, BlockRecord, VitTrace, pre_norm_step, run_blocks
from .timm_common import REDUCTIONS, TimmTokens, timm_attention


@BACKBONES.register("timm_vit")
class TimmVitBackbone(TimmTokens):
    """Image access to a timm `VisionTransformer` (never modified).

    `image_size` is the side of the square views; it defaults to the model's input size
    and may differ only for models created with `dynamic_img_size=True`.
    `projection` (optional module) is the head of an open_clip `TimmModel` tower over this
    trunk (`visual.head`); `mean` and `std` override the model's pretrained normalisation.
    """

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def __init__(
        self,
        model: nn.Module,
        image_size: Optional[int] = None,
        projection: Optional[nn.Module] = None,
        mean=None,
        std=None,
    ):
        from timm.layers import AttentionPoolLatent
        from timm.models.vision_transformer import Attention, Block, ResPostBlock, VisionTransformer

        if not isinstance(model, VisionTransformer):
            raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
        self._setup(model, projection, mean, std)
        self.distilled = getattr(model, "dist_token", None) is not None and hasattr(model, "head_dist")
        unsupported = []
        pool = model.global_pool
        if model.attn_pool is not None:
            if type(model.attn_pool) is not AttentionPoolLatent or model.attn_pool.pool not in ("token", "avg"):
                unsupported.append(f"attention pooling {type(model.attn_pool).__name__} (global_pool={pool!r})")
        elif not self.distilled and pool not in REDUCTIONS:
            unsupported.append(f"global_pool={pool!r} (no pooled features)")
        expected_head = _distilled_forward_head() if self.distilled else VisionTransformer.forward_head
        if (
            type(model).forward_head is not expected_head
            or type(model).pool is not VisionTransformer.pool
            or type(model).forward_features is not VisionTransformer.forward_features
        ):
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
                "pooled by class token (+ distillation token), avg, max, avgmax or latent attention (map)"
            )
        self._setup_size(model, image_size)

    def embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Normalised images -> (tokens entering block 0, patch grid), the model's own embedding."""
        model = self.model
        self._check_size(x)
        x = model.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(model.patch_embed.grid_size)
        x = model.norm_pre(model.patch_drop(model._pos_embed(x)))
        if x.shape[1] - model.num_prefix_tokens != grid[0] * grid[1]:
            raise NotImplementedError(
                f"{x.shape[1]} tokens do not make {model.num_prefix_tokens} prefix tokens and a {grid} patch grid"
            )
        return x, grid

    def trace(self, images: torch.Tensor, first_block: int = 0) -> VitTrace:
        """ViT forward recording blocks >= first_block; earlier blocks run without autograd."""
        with torch.no_grad():
            x, grid = self.embed(self.normalize(images))
        x, records = run_blocks(self.model.blocks, x, first_block, _traced_block)
        return self.finish_trace(x, records, grid)


def _traced_block(block, x: torch.Tensor):
    """timm's Block (pre-norm) or ResPostBlock (post-norm) with the attention probabilities kept."""
    from timm.models.vision_transformer import ResPostBlock

    if type(block) is ResPostBlock:
        attended, probs = timm_attention(block.attn, x)
        record = BlockRecord(tokens=x, normed=x, attn=probs)
        x = x + block.drop_path1(block.norm1(attended))
        return x + block.drop_path2(block.norm2(block.mlp(x))), record
    return pre_norm_step(
        x,
        block.norm1,
        lambda normed: timm_attention(block.attn, normed),
        block.norm2,
        block.mlp,
        lambda a: block.drop_path1(block.ls1(a)),
        lambda m: block.drop_path2(block.ls2(m)),
    )


def _distilled_forward_head():
    from timm.models.deit import VisionTransformerDistilled

    return VisionTransformerDistilled.forward_head
