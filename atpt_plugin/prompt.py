"""CoOp-style prompt: [SOS] ctx_1..ctx_n classname "." [EOS], only the context is learnable.

Token embeddings around the context are frozen and computed once. The text transformer
is causal, so the sequence is cut after the longest EOT position without changing any
feature (tested), which makes every text pass cheaper.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .backbones.openclip import OpenClipBackbone

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
        raise ValueError(f"duplicate class names {sorted(set(duplicates))!r}: two classes with one "
                         "text prompt cannot be told apart; make the names unique")
    return [n.strip() for n in names]


class PromptLearner(nn.Module):
    """Frozen pieces of the class prompts; `text_features(ctx)` runs the text tower."""

    def __init__(self, backbone: OpenClipBackbone, classnames: Sequence[str], tokenizer,
                 context_phrase: Optional[str], n_ctx: int, generator: torch.Generator):
        super().__init__()
        self.backbone = backbone
        tower = backbone.text_tower
        pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if pool_type != "argmax" or getattr(tower, "cls_emb", None) is not None:
            raise NotImplementedError(
                f"text pooling {pool_type!r} is not supported; prompt tuning needs an "
                "EOT-pooled (argmax) text tower such as OpenAI CLIP's")
        names = check_classnames(classnames)
        if context_phrase is not None:
            n_ctx = self._count_tokens(tokenizer, context_phrase)
            context_text = context_phrase
        else:
            context_text = " ".join([CONTEXT_PLACEHOLDER] * n_ctx)
        texts = [f"{context_text} {name}." for name in names]
        self._check_fits(tokenizer, texts, tower)
        tokens = tokenizer(texts)
        eot = tokens.argmax(dim=-1)
        tokens = tokens[:, : int(eot.max()) + 1]
        device = backbone.device
        with torch.no_grad():
            embedded = tower.token_embedding(tokens.to(device))
        self.n_ctx = n_ctx
        self.classnames = names
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone(), persistent=False)
        self.register_buffer("eot", eot.to(device), persistent=False)
        if context_phrase is not None:
            initial = embedded[0, 1:1 + n_ctx].clone()
        else:
            initial = torch.randn(n_ctx, embedded.shape[-1], generator=generator) * 0.02
        self.register_buffer("initial_context", initial.to(device, embedded.dtype), persistent=False)

    @staticmethod
    def _count_tokens(tokenizer, phrase: str) -> int:
        ids = tokenizer([phrase])[0]
        return int((ids != 0).sum()) - 2  # without SOT and EOT

    @staticmethod
    def _check_fits(tokenizer, texts, tower):
        limit = getattr(tokenizer, "context_length", None) or tokenizer([texts[0]]).shape[1]
        model_limit = tower.positional_embedding.shape[0]
        if hasattr(tokenizer, "encode"):
            lengths = [len(tokenizer.encode(t)) + 2 for t in texts]
            longest = max(range(len(texts)), key=lengths.__getitem__)
            if lengths[longest] > min(limit, model_limit):
                raise ValueError(
                    f"the prompt {texts[longest]!r} needs {lengths[longest]} tokens but the "
                    f"tokenizer/model context holds {min(limit, model_limit)}; shorten the class "
                    "name or ctx_init, or use a tokenizer with a longer context_length")
        if limit > model_limit:
            raise ValueError(f"tokenizer context_length {limit} exceeds the text model's "
                             f"{model_limit}; use open_clip.get_tokenizer(<the model's name>)")

    def text_features(self, context: torch.Tensor) -> torch.Tensor:
        """(C, E) L2-normalised class features for the context (n_ctx, D); (B, C, E) for B
        independent contexts (B, n_ctx, D), all B*C prompts in one text pass."""
        contexts = context.unsqueeze(0) if context.dim() == 2 else context
        batch, count = contexts.shape[0], self.prefix.shape[0]
        embeddings = torch.cat(
            [self.prefix.expand(batch, -1, -1, -1),
             contexts.to(self.prefix.dtype).unsqueeze(1).expand(-1, count, -1, -1),
             self.suffix.expand(batch, -1, -1, -1)], dim=2).flatten(0, 1)
        mask = self.backbone.text_tower.attn_mask
        length = embeddings.shape[1]
        mask = mask[:length, :length] if mask is not None else None
        features = self.backbone.encode_text_embeddings(embeddings, self.eot.repeat(batch), mask)
        features = features.unflatten(0, (batch, count))
        return features[0] if context.dim() == 2 else features
