"""Attention rollouts on ViT towers: A-TPT's token-gradient rollout and its ablations.

Each variant builds one refined matrix per block, Ahat = I + relu(E_h(weighted A)),
then multiplies them later-block-on-the-left and reads the class token's row:
- token_gradient (A-TPT): weighted A = A diag(W), W = L1norm(relu(<T, dS/dT>));
- attention_gradient (Chefer et al. 2021): weighted A = dS/dA * A;
- none (Abnar & Zuidema 2020): weighted A = A.
`eps` is added to every divisor (token-weight sum, row sums, layer average, map span), as
the authors' code adds 1e-8; where the weights themselves are ~1e-7 (the literal token
site, docs/method.md §8.1) that moves the map, so it is a setting.
Every step is a public function, and `RolloutExplainer.trace` returns what each produced,
so each can be checked against a reference on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .base import EXPLAINERS, Explainer, Score, clip_threshold, rescale


@dataclass
class BlockInternals:
    """What one block contributed to the rollout."""

    attention: Optional[torch.Tensor]  # (N, L, L) attention probabilities, mean over heads
    token_scores: Optional[torch.Tensor]  # (N, L) <T_j, dS/dT_j> before the ReLU (token_gradient only)
    refined: torch.Tensor  # (N, L, L) Ahat^(b), as the rollout used it


@dataclass
class RolloutInternals:
    """Every intermediate of one batched explanation, from the blocks to the maps."""

    blocks: List[BlockInternals]  # the blocks the rollout used, first to last
    row: torch.Tensor  # (N, L) rollout row the pooled output reads, raw
    threshold: torch.Tensor  # (N,) clip value of the patch part of `row`
    maps: torch.Tensor  # (N, h, w) in [0, 1]: what the explainer returns
    num_prefix_tokens: int
    grid_size: Tuple[int, int]
    query_weights: Optional[torch.Tensor] = None


def token_scores(tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """<T_j, dS/dT_j> per image and token, summed over the embedding dimension."""
    return (tokens * grads).sum(dim=-1).float()


def token_weights(scores: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """W = relu(scores) / (sum + eps) per image, over all tokens (CLS included)."""
    raw = torch.relu(scores)
    return raw / (raw.sum(dim=-1, keepdim=True) + eps).clamp_min(torch.finfo(raw.dtype).tiny)


def refine(weighted_attention: torch.Tensor, row_normalize: bool, eps: float = 0.0) -> torch.Tensor:
    """I + relu(mean over heads), optionally with rows scaled to sum to one (+ eps)."""
    mean = torch.relu(weighted_attention.float().mean(dim=1))
    refined = mean + torch.eye(mean.shape[-1], device=mean.device, dtype=mean.dtype)
    return refined / (refined.sum(dim=-1, keepdim=True) + eps) if row_normalize else refined


def rollout(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Ahat^(B) @ ... @ Ahat^(1) for matrices given first block first."""
    result = matrices[0]
    for matrix in matrices[1:]:
        result = matrix @ result
    return result


def last_two_rollout(previous: torch.Tensor, last: torch.Tensor, layer_weights, row_normalize: bool, eps: float = 0.0):
    """A-TPT's stabilisation: Ahat^(B) @ weighted average of Ahat^(B-1) and Ahat^(B)."""
    w_prev, w_last = layer_weights
    average = (w_prev * previous + w_last * last) / (w_prev + w_last + eps)
    if row_normalize:
        average = average / (average.sum(dim=-1, keepdim=True) + eps)
    return last @ average


def pooled_row(relevance: torch.Tensor, query_weights=None) -> torch.Tensor:
    """The relevance row of what the pooled output reads: row 0 (class token) or a weighted mix of rows."""
    if query_weights is None:
        return relevance[:, 0]
    weights = query_weights.to(relevance).expand(relevance.shape[0], -1)
    return torch.einsum("nl,nlk->nk", weights, relevance)


class RolloutExplainer(Explainer):
    """One batched forward (+ one backward when gradients weight the attention)."""

    def __init__(
        self,
        weighting: str = "token_gradient",
        layers: str = "last_two",
        token_site: str = "normed",
        layer_weights=(1.0, 1.0),
        row_normalize: bool = True,
        clip_quantile: float = 0.99,
        eps: float = 0.0,
    ):
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
        self.eps = eps

    def __call__(self, backbone, images: torch.Tensor, score: Score) -> torch.Tensor:
        return self._explain(backbone, images, score, keep=False).maps

    def trace(self, backbone, images: torch.Tensor, score: Score) -> RolloutInternals:
        """The maps `__call__` returns, with every intermediate (one extra head mean per block)."""
        return self._explain(backbone, images, score, keep=True)

    def relevance_row(self, refined: Sequence[torch.Tensor], query_weights=None) -> torch.Tensor:
        """(N, L) the pooled output's rollout row from refined block matrices (first block first)."""
        if self.layers == "last_two" and len(refined) == 2:
            relevance = last_two_rollout(refined[0], refined[1], self.layer_weights, self.row_normalize, self.eps)
        else:
            relevance = rollout(refined)
        return pooled_row(relevance, query_weights).detach()

    def post_process(self, row: torch.Tensor, num_prefix_tokens: int, grid_size) -> Tuple[torch.Tensor, torch.Tensor]:
        """(threshold (N,), maps (N, h, w) in [0, 1]) from rollout rows: patch grid, quantile clip, min-max."""
        maps = row[:, num_prefix_tokens:].reshape(-1, *grid_size)
        threshold = clip_threshold(maps, self.clip_quantile)
        return threshold, rescale(maps, threshold, self.eps)

    def _explain(self, backbone, images: torch.Tensor, score: Score, keep: bool) -> RolloutInternals:
        first = max(backbone.num_blocks - 2, 0) if self.layers == "last_two" else 0
        with torch.set_grad_enabled(self.weighting != "none"):  # plain rollout needs no graph
            trace = backbone.trace(images, first_block=first)
            blocks = self._blocks(trace, score, keep)
        row = self.relevance_row([block.refined for block in blocks], trace.query_weights)
        threshold, maps = self.post_process(row, trace.num_prefix_tokens, trace.grid_size)
        return RolloutInternals(
            blocks, row, threshold, maps, trace.num_prefix_tokens, tuple(trace.grid_size), trace.query_weights
        )

    def _blocks(self, trace, score: Score, keep: bool) -> List[BlockInternals]:
        records = trace.blocks
        attentions = [r.attn.detach().float().mean(dim=1) if keep else None for r in records]
        if self.weighting == "none":
            return [
                BlockInternals(a, None, refine(r.attn.detach(), self.row_normalize, self.eps))
                for a, r in zip(attentions, records)
            ]
        total = score(trace.pooled)
        if self.weighting == "attention_gradient":
            grads = torch.autograd.grad(total, [r.attn for r in records])
            return [
                BlockInternals(a, None, refine((g * r.attn).detach(), self.row_normalize, self.eps))
                for a, g, r in zip(attentions, grads, records)
            ]
        sites = [r.normed if self.token_site == "normed" else r.tokens for r in records]
        grads = torch.autograd.grad(total, sites)
        blocks = []
        for attention, site, grad, record in zip(attentions, sites, grads, records):
            scores = token_scores(site.detach(), grad)
            weights = token_weights(scores, self.eps)
            refined = refine(record.attn.detach() * weights[:, None, None, :], self.row_normalize, self.eps)
            blocks.append(BlockInternals(attention, scores if keep else None, refined))
        return blocks


@EXPLAINERS.register("token_grad_rollout")
def token_grad_rollout(config) -> RolloutExplainer:
    """A-TPT: attention refined by token-gradient weights, last two blocks averaged."""
    return RolloutExplainer(
        "token_gradient",
        config.rollout_layers,
        config.token_site,
        config.layer_weights,
        config.row_normalize,
        config.clip_quantile,
        eps=config.explainer_eps,
    )


@EXPLAINERS.register("grad_rollout")
def grad_rollout(config) -> RolloutExplainer:
    """Chefer et al. 2021: attention weighted by its gradient, rolled out over all blocks."""
    return RolloutExplainer(
        "attention_gradient", "all", row_normalize=False, clip_quantile=config.clip_quantile, eps=config.explainer_eps
    )


@EXPLAINERS.register("attention_rollout")
def attention_rollout(config) -> RolloutExplainer:
    """Abnar & Zuidema 2020: plain attention rolled out over all blocks, no gradients."""
    return RolloutExplainer(
        "none", "all", row_normalize=True, clip_quantile=config.clip_quantile, eps=config.explainer_eps
    )
