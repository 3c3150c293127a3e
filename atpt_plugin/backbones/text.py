"""Token ids from any tokenizer, laid out as a text tower reads them.

Two kinds of tokenizer are taken, so users pass the one that comes with their model:
open_clip's (`tokenizer(texts) -> (N, context_length)` tensor, padded and silently truncated
to its context length) and `transformers`' (`tokenizer(texts)["input_ids"]`, one list of ids
per text, or any callable returning such a mapping). Every prompt must fit the model's text
context: a truncated prompt loses its end-of-text token, which is where CLIP reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Sequence

import torch


def token_ids(tokenizer, texts: Sequence[str], length: int, pad_id: int) -> torch.Tensor:
    """(N, length) ids of `texts`, right-padded with `pad_id`; a clear error when a prompt or
    the tokenizer's context does not fit the model's `length`."""
    texts = list(texts)
    if not callable(tokenizer):
        raise ValueError(
            f"tokenizer= is a {type(tokenizer).__name__}, not a tokenizer: pass the callable that comes with the "
            "model, open_clip.get_tokenizer(<model name>) or transformers.AutoTokenizer.from_pretrained(<model>)"
        )
    output = tokenizer(texts)
    ids = output["input_ids"] if isinstance(output, Mapping) else output
    if torch.is_tensor(ids):
        _check_fixed_width(tokenizer, texts, ids.shape[-1], length)
        rows = list(ids.long().cpu())
    else:
        rows = [torch.as_tensor(row, dtype=torch.long) for row in ids]
        longest = max(range(len(rows)), key=lambda i: len(rows[i]))
        if len(rows[longest]) > length:
            raise ValueError(
                f"the prompt {texts[longest]!r} needs {len(rows[longest])} tokens but the text model's "
                f"context holds {length}; shorten the class name or ctx_init"
            )
    padded = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = row
    return padded


def _check_fixed_width(tokenizer, texts, width: int, model_limit: int):
    """An open_clip-style tokenizer pads to its context length and truncates silently: measure
    the prompts with its `encode` (without start and end tokens) where it has one."""
    limit = getattr(tokenizer, "context_length", None) or width
    if hasattr(tokenizer, "encode"):
        lengths = [len(tokenizer.encode(t)) + 2 for t in texts]
        longest = max(range(len(texts)), key=lengths.__getitem__)
        if lengths[longest] > min(limit, model_limit):
            raise ValueError(
                f"the prompt {texts[longest]!r} needs {lengths[longest]} tokens but the "
                f"tokenizer/model context holds {min(limit, model_limit)}; shorten the class "
                "name or ctx_init, or use a tokenizer with a longer context_length"
            )
    if max(limit, width) > model_limit:
        raise ValueError(
            f"tokenizer context_length {max(limit, width)} exceeds the text model's "
            f"{model_limit}; use the tokenizer made for the model (open_clip.get_tokenizer("
            "<the model's name>))"
        )
