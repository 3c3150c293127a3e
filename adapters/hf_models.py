"""`atpt eval --model hf:<hub id or local folder>`: a Hugging Face CLIPModel / SiglipModel and its
tokenizer, offline from a local folder (`save_pretrained` of both) or the Hugging Face cache.

`--pretrained` keeps its default (the weights that come with the model) or is `none` for a
random init from the model's config, seeded like open_clip models. Missing weights give the
same `PretrainedUnavailable` error, with the fix, as open_clip models do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

HF_PREFIX = "hf:"
RANDOM = ("none", "None", "random")
WITH_WEIGHTS = (None, "", "openai", "hf")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model", "tokenizer.model")


def check_model_folder(folder: Path, spec: str) -> None:
    """A local folder must hold a model (config.json) and its tokenizer, both from save_pretrained."""
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"--model hf:{spec}: the folder has no config.json, so it is not a model saved with save_pretrained; "
            "give the folder that model.save_pretrained(...) and tokenizer.save_pretrained(...) wrote"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"--model hf:{spec}: the folder has the model but no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); "
            "save the model's tokenizer there too: AutoTokenizer.from_pretrained(<hub id>).save_pretrained(folder)"
        )


def create_hf_model(spec: str, pretrained: Optional[str], seed: int = 0):
    """(model, tokenizer, model name, pretrained as recorded) for `hf:<spec>` (the prefix removed)."""
    import torch
    import transformers

    from atpt_plugin.backbones import detect

    from .models import PretrainedUnavailable

    if pretrained not in RANDOM + WITH_WEIGHTS:
        raise ValueError(
            f"--model hf:{spec} brings its own weights: leave --pretrained at its default, or pass "
            f"'none' for a random init from its config (got {pretrained!r})"
        )
    local = Path(spec).expanduser()
    if local.is_dir():
        check_model_folder(local, spec)
        source = str(local.resolve())
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(
            f"--model hf:{spec}: no such folder (a local model is a folder written by "
            "save_pretrained of the model and its tokenizer)"
        )
    else:
        source = spec
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        if pretrained in RANDOM:
            torch.manual_seed(seed)
            model = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(source))
        else:
            model = transformers.AutoModel.from_pretrained(source)
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
        why = "offline mode (HF_HUB_OFFLINE is set)" if offline else "no network access or no cached copy"
        raise PretrainedUnavailable(
            f"the Hugging Face model {spec!r} could not be loaded ({why}): {error}\n"
            f"Fetch it on a machine with internet access (transformers.AutoModel.from_pretrained({spec!r}) and "
            "AutoTokenizer.from_pretrained fill the Hugging Face cache; copy ~/.cache/huggingface over), or "
            "save both with save_pretrained into a folder and pass --model hf:/path/to/folder"
        ) from None
    try:
        detect(model, has_text=True)
    except TypeError:
        raise ValueError(
            f"--model hf:{spec} is a {type(model).__name__}; atpt eval takes Hugging Face CLIPModel "
            "or SiglipModel checkpoints"
        ) from None
    return model.eval(), tokenizer, f"{HF_PREFIX}{spec}", "none" if pretrained in RANDOM else source
