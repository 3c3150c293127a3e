"""What the episodic loop needs from a timm `Eva` (EVA, EVA-02, EVA-CLIP trunks): its block
stack traced with the rotary position embeddings applied.

`Eva.forward_features` hands each block the rotary embedding of the patch grid
(`_pos_embed` returns it beside the tokens; RoPE-mixed models have one per block). The trace
re-runs each `EvaBlock` / `EvaBlockPostNorm` with the model's own submodules and an explicit
softmax attention that rotates queries and keys exactly as `EvaAttention` does (prefix
tokens unrotated), so the traced output equals the model's own (`tests/test_families.py`).
Pooling (class token, avg, max, avgmax, latent attention) and heads are shared with the
ViT backbone (`timm_common.py`). Refused with a clear error: `attn_type="rope"`
(AttentionRope, grouped-query) blocks and patch dropout at inference.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import BACKBONES, BlockRecord, VitTrace, pre_norm_step, run_blocks, softmax_attention
from .timm_common import REDUCTIONS, TimmTokens


def eva_attention(attn: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor]):
    """`EvaAttention.forward` on `x` with an explicit softmax; returns (output, probabilities)."""
    from timm.layers import apply_rot_embed_cat

    n, length, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.qkv is not None:
        if attn.q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(n, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (
            proj(x).reshape(n, length, attn.num_heads, -1).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        prefix, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q, k = (
            torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
            for t in (q, k)
        )
    out, probs = softmax_attention((q * attn.scale) @ k.transpose(-2, -1), v)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), probs


def _scaled(gamma, x):
    return x if gamma is None else gamma * x


def _traced_block(step, x: torch.Tensor):
    """An EvaBlock (pre-norm, optional layer scale) or EvaBlockPostNorm, attention probabilities kept."""
    from timm.models.eva import EvaBlockPostNorm

    block, rope = step
    if type(block) is EvaBlockPostNorm:
        attended, probs = eva_attention(block.attn, x, rope)
        record = BlockRecord(tokens=x, normed=x, attn=probs)
        x = x + block.drop_path1(block.norm1(attended))
        return x + block.drop_path2(block.norm2(block.mlp(x))), record
    return pre_norm_step(
        x,
        block.norm1,
        lambda normed: eva_attention(block.attn, normed, rope),
        block.norm2,
        block.mlp,
        lambda a: block.drop_path1(_scaled(block.gamma_1, a)),
        lambda m: block.drop_path2(_scaled(block.gamma_2, m)),
    )


@BACKBONES.register("timm_eva")
class TimmEvaBackbone(TimmTokens):
    """Image access to a timm `Eva` (never modified); options as `TimmVitBackbone`'s."""

    @classmethod
    def accepts(cls, model: nn.Module) -> bool:
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def __init__(
        self,
        model: nn.Module,
        image_size: Optional[int] = None,
        projection: Optional[nn.Module] = None,
        mean=None,
        std=None,
    ):
        from timm.layers import AttentionPoolLatent
        from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

        if not isinstance(model, Eva):
            raise TypeError(f"expected a timm Eva, got {type(model).__name__}")
        self._setup(model, projection, mean, std)
        unsupported = []
        if model.attn_pool is not None:
            if type(model.attn_pool) is not AttentionPoolLatent or model.attn_pool.pool not in ("token", "avg"):
                unsupported.append(f"attention pooling {type(model.attn_pool).__name__}")
        elif model.global_pool not in REDUCTIONS:
            unsupported.append(f"global_pool={model.global_pool!r} (no pooled features)")
        if (
            type(model).forward_head is not Eva.forward_head
            or type(model).pool is not Eva.pool
            or type(model).forward_features is not Eva.forward_features
        ):
            unsupported.append(f"its own forward_features/pool/forward_head ({type(model).__name__})")
        blocks = set(type(b) for b in model.blocks) - {EvaBlock, EvaBlockPostNorm}
        if blocks:
            unsupported.append(f"{', '.join(sorted(t.__name__ for t in blocks))} blocks")
        elif any(type(b.attn) is not EvaAttention for b in model.blocks):
            names = sorted({type(b.attn).__name__ for b in model.blocks} - {"EvaAttention"})
            unsupported.append(f"{', '.join(names)} attention (attn_type='rope')")
        if model.patch_drop is not None:
            unsupported.append("patch dropout")
        if unsupported:
            raise NotImplementedError(
                f"this timm Eva ({type(model).__name__}) uses {'; '.join(unsupported)}; the attention explainers "
                "support Evas with EvaBlock/EvaBlockPostNorm blocks and EvaAttention (with or without RoPE), "
                "pooled by class token, avg, max, avgmax or latent attention (map)"
            )
        self._setup_size(model, image_size)

    def pool_start(self, attention_pool: bool) -> int:
        """Eva's latent attention pool reads every token, its reductions the patch tokens."""
        return 0 if attention_pool else self.model.num_prefix_tokens

    def trace(self, images: torch.Tensor, first_block: int = 0) -> VitTrace:
        """Eva forward recording blocks >= first_block, each with its rotary embedding."""
        model = self.model
        with torch.no_grad():
            x = self.normalize(images)
            self._check_size(x)
            x = model.patch_embed(x)
            grid = tuple(x.shape[1:3]) if x.dim() == 4 else tuple(model.patch_embed.grid_size)
            x, rope = model._pos_embed(x)
            x = model.norm_pre(x)
        ropes = [rope[i] if model.rope_mixed and rope is not None else rope for i in range(len(model.blocks))]
        steps = list(zip(model.blocks, ropes))
        x, records = run_blocks(
            steps, x, first_block, _traced_block, plain_step=lambda step, tokens: step[0](tokens, rope=step[1])
        )
        return self.finish_trace(x, records, grid)
