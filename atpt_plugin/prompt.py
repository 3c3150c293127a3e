"""CoOp-style prompt: [SOS] ctx_1..ctx_n classname "." [EOS], only the context is learnable.

Token embeddings around the context are frozen and computed once. The family's text side
(`backbones/base.py`) says how the model reads a prompt: its tokenizer's layout, where the
feature is pooled, whether the mask is causal. A causal tower's sequence is cut after the
longest pooled (EOS) position without changing any feature (tested), which makes every text
pass cheaper; a bidirectional one (SigLIP) keeps its fixed, padded length.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .backbones.base import Backbone

CONTEXT_PLACEHOLDER = "X"


def check_classnames(classnames) -> list:
    if classnames is None or isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError("classnames must be a non-empty list of class names, e.g. ['cat', 'dog']")
    names = list(classnames)
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings, got {bad[:5]!r}")
    seen, duplicates = set(), []
    for name in names:
        key = name.strip().lower()
        if key in seen:
            duplicates.append(name)
        seen.add(key)
    if duplicates:
        raise ValueError(
            f"duplicate class names {sorted(set(duplicates))!r}: two classes with one "
            "text prompt cannot be told apart; make the names unique"
        )
    return [n.strip() for n in names]


def _common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    differs = (a != b).nonzero()
    return int(differs[0]) if len(differs) else len(a)


def context_span(backbone: Backbone, tokenizer, context_text: str, ids: torch.Tensor):
    """(start, end) of the context tokens in every prompt of `ids`: after the tokenizer's leading
    special tokens (what an empty text starts with), as long as the context phrase alone."""
    empty, phrase = backbone.tokenize(tokenizer, ["", context_text])
    start, end = _common_prefix(empty, ids[0]), _common_prefix(phrase, ids[0])
    if end <= start or not (ids[:, start:end] == phrase[start:end]).all():
        raise ValueError(
            f"the context {context_text!r} is not tokenised the same way at the start of every "
            "class prompt; use another ctx_init"
        )
    return start, end


def check_vocabulary(backbone: Backbone, tokens: torch.Tensor) -> None:
    """Ids the text model has no embedding for mean the tokenizer is another model's: say so
    before anything reads them (the embedding would raise a bare IndexError)."""
    largest = int(tokens.max())
    try:
        with torch.no_grad():
            backbone.token_embedding(torch.tensor([[largest]], device=backbone.device))
    except IndexError:
        raise ValueError(
            f"the tokenizer gives token id {largest}, beyond the text model's vocabulary: it is not this "
            "model's tokenizer; pass the one saved with the model (transformers.AutoTokenizer.from_pretrained "
            "of the same id or folder, open_clip.get_tokenizer of the same model name)"
        ) from None


class PromptLearner(nn.Module):
    """Frozen pieces of the class prompts; `text_features(ctx)` runs the text tower."""

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        tokenizer,
        context_phrase: Optional[str],
        n_ctx: int,
        generator: torch.Generator,
    ):
        super().__init__()
        self.backbone = backbone
        names = check_classnames(classnames)
        context_text = context_phrase if context_phrase is not None else " ".join([CONTEXT_PLACEHOLDER] * n_ctx)
        tokens = backbone.tokenize(tokenizer, [f"{context_text} {name}." for name in names])
        check_vocabulary(backbone, tokens)
        start, end = context_span(backbone, tokenizer, context_text, tokens)
        if context_phrase is None and end - start != n_ctx:
            raise ValueError(
                f"the placeholder context {context_text!r} is {end - start} tokens for this "
                f"tokenizer, not n_ctx={n_ctx}; set ctx_init to a phrase instead"
            )
        pool = backbone.text_pool_index(tokens)
        if backbone.text_causal:
            tokens = tokens[:, : int(pool.max()) + 1]
        device = backbone.device
        with torch.no_grad():
            embedded = backbone.token_embedding(tokens.to(device))
        self.n_ctx = end - start
        self.classnames = names
        self.register_buffer("prefix", embedded[:, :start].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, end:].clone(), persistent=False)
        self.register_buffer("pool", pool.to(device), persistent=False)
        if context_phrase is not None:
            initial = embedded[0, start:end].clone()
        else:
            initial = torch.randn(n_ctx, embedded.shape[-1], generator=generator) * 0.02
        self.register_buffer("initial_context", initial.to(device, embedded.dtype), persistent=False)

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        """(C, E) L2-normalised class features for the context (n_ctx, D); (B, C, E) for B
        independent contexts (B, n_ctx, D), all B*C prompts in one text pass."""
        contexts = context.unsqueeze(0) if context.dim() == 2 else context
        batch, count = contexts.shape[0], self.prefix.shape[0]
        embeddings = torch.cat(
            [
                self.prefix.expand(batch, -1, -1, -1),
                contexts.to(self.prefix.dtype).unsqueeze(1).expand(-1, count, -1, -1),
                self.suffix.expand(batch, -1, -1, -1),
            ],
            dim=2,
        ).flatten(0, 1)
        features = self.backbone.encode_text_embeddings(embeddings, self.pool.repeat(batch))
        features = features.unflatten(0, (batch, count))
        return features[0] if context.dim() == 2 else features
