"""Attention rollouts on ViT towers: A-TPT's token-gradient rollout and its ablations.

Each variant builds one refined matrix per block, Ahat = I + relu(E_h(weighted A)),
then multiplies them later-block-on-the-left and reads the class token's row:
- token_gradient (A-TPT): weighted A = A diag(W), W = L1norm(relu(<T, dS/dT>));
- attention_gradient (Chefer et al. 2021): weighted A = dS/dA * A;
- none (Abnar & Zuidema 2020): weighted A = A.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .base import EXPLAINERS, Explainer, Score, clip_and_rescale


def token_weights(tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """W = L1-normalise(relu(<T_j, dS/dT_j>)) per image, over all tokens (CLS included)."""
    raw = torch.relu((tokens * grads).sum(dim=-1).float())
    return raw / raw.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(raw.dtype).tiny)


def refine(weighted_attention: torch.Tensor, row_normalize: bool) -> torch.Tensor:
    """I + relu(mean over heads), optionally with rows scaled to sum to one."""
    mean = torch.relu(weighted_attention.float().mean(dim=1))
    refined = mean + torch.eye(mean.shape[-1], device=mean.device, dtype=mean.dtype)
    return refined / refined.sum(dim=-1, keepdim=True) if row_normalize else refined


def rollout(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ahat^(B) @ ... @ Ahat^(1) for matrices given first block first."""
    result = matrices[0]
    for matrix in matrices[1:]:
        result = matrix @ result
    return result


def last_two_rollout(previous: torch.Tensor, last: torch.Tensor, layer_weights, row_normalize: bool):
    """A-TPT's stabilisation: Ahat^(B) @ weighted average of Ahat^(B-1) and Ahat^(B)."""
    w_prev, w_last = layer_weights
    average = (w_prev * previous + w_last * last) / (w_prev + w_last)
    if row_normalize:
        average = average / average.sum(dim=-1, keepdim=True)
    return last @ average


def pooled_row(relevance: torch.Tensor, query_weights=None) -> torch.Tensor:
    """The relevance row of what the pooled output reads: row 0 (class token) or a weighted mix of rows."""
    if query_weights is None:
        return relevance[:, 0]
    weights = query_weights.to(relevance).expand(relevance.shape[0], -1)
    return torch.einsum("nl,nlk->nk", weights, relevance)


class RolloutExplainer(Explainer):
    """One batched forward (+ one backward when gradients weight the attention)."""

    def __init__(self, weighting: str = "token_gradient", layers: str = "last_two",
                 token_site: str = "normed", layer_weights=(1.0, 1.0), row_normalize: bool = True,
                 clip_quantile: float = 0.99):
        if weighting not in ("token_gradient", "attention_gradient", "none"):
            raise ValueError(f"unknown rollout weighting {weighting!r}")
        if layers == "last_two" and weighting != "token_gradient":
            raise ValueError("last_two averaging is defined for the token-gradient rollout")
        self.weighting = weighting
        self.layers = layers
        self.token_site = token_site
        self.layer_weights = tuple(layer_weights)
        self.row_normalize = row_normalize
        self.clip_quantile = clip_quantile

    def __call__(self, backbone, images: torch.Tensor, score: Score) -> torch.Tensor:
        first = max(backbone.num_blocks - 2, 0) if self.layers == "last_two" else 0
        with torch.set_grad_enabled(self.weighting != "none"):  # plain rollout needs no graph
            trace = backbone.trace(images, first_block=first)
            matrices = self._refined_matrices(trace, score)
        if self.layers == "last_two" and len(matrices) == 2:
            relevance = last_two_rollout(matrices[0], matrices[1], self.layer_weights, self.row_normalize)
        else:
            relevance = rollout(matrices)
        prefix = trace.num_prefix_tokens
        maps = pooled_row(relevance, trace.query_weights)[:, prefix:].reshape(-1, *trace.grid_size)
        return clip_and_rescale(maps.detach(), self.clip_quantile)

    def _refined_matrices(self, trace, score: Score) -> List[torch.Tensor]:
        blocks = trace.blocks
        if self.weighting == "none":
            return [refine(b.attn.detach(), self.row_normalize) for b in blocks]
        total = score(trace.pooled)
        if self.weighting == "attention_gradient":
            grads = torch.autograd.grad(total, [b.attn for b in blocks])
            return [refine((g * b.attn).detach(), self.row_normalize) for g, b in zip(grads, blocks)]
        sites = [b.normed if self.token_site == "normed" else b.tokens for b in blocks]
        grads = torch.autograd.grad(total, sites)
        matrices = []
        for site, grad, block in zip(sites, grads, blocks):
            weights = token_weights(site.detach(), grad)
            matrices.append(refine(block.attn.detach() * weights[:, None, None, :], self.row_normalize))
        return matrices


@EXPLAINERS.register("token_grad_rollout")
def token_grad_rollout(config) -> RolloutExplainer:
    """A-TPT: attention refined by token-gradient weights, last two blocks averaged."""
    return RolloutExplainer("token_gradient", config.rollout_layers, config.token_site,
                            config.layer_weights, config.row_normalize, config.clip_quantile)


@EXPLAINERS.register("grad_rollout")
def grad_rollout(config) -> RolloutExplainer:
    """Chefer et al. 2021: attention weighted by its gradient, rolled out over all blocks."""
    return RolloutExplainer("attention_gradient", "all", row_normalize=False, clip_quantile=config.clip_quantile)


@EXPLAINERS.register("attention_rollout")
def attention_rollout(config) -> RolloutExplainer:
    """Abnar & Zuidema 2020: plain attention rolled out over all blocks, no gradients."""
    return RolloutExplainer("none", "all", row_normalize=True, clip_quantile=config.clip_quantile)
