"""Models by name for `atpt eval`: open_clip names and configs, the embedded demo CLIP."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights that cannot be had (offline, unknown tag, missing file)."""


DEMO_MODEL = "demo"  # short for the embedded small CLIP trained on Fashion-MNIST (fmnist-vit-tiny)
DEFAULT_PRETRAINED = "openai"


def create_model(name: str, pretrained: Optional[str], seed: int = 0):
    """(model, tokenizer, model name, pretrained as recorded) for an open_clip name or config.

    name: an open_clip model name (`open_clip.list_models()`, which includes the embedded
    `fmnist-vit-tiny`, also called `demo`), a path to a model config JSON (its file stem
    becomes the name), or `hf:<Hugging Face id or folder>` (`hf_models.py`). pretrained: a
    tag ("openai"), a path to a state dict, "none" for random initialisation seeded with
    `seed`, or None for the model's default (the shipped weights of the embedded model,
    "openai" for the others).
    """
    import open_clip
    import torch

    from atpt_plugin.demo_model import MODEL_NAME, checkpoint_path  # registers the embedded model's config
    from atpt_plugin.registry import unknown_name

    from .hf_models import HF_PREFIX, create_hf_model

    if name.startswith(HF_PREFIX):
        return create_hf_model(name[len(HF_PREFIX) :], pretrained, seed)
    if name in (DEMO_MODEL, MODEL_NAME):
        name = MODEL_NAME
        if pretrained in (None, ""):
            pretrained = str(checkpoint_path())
    elif pretrained in (None, ""):
        pretrained = DEFAULT_PRETRAINED
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model config {str(path)!r} does not exist")
        open_clip.add_model_config(path)
        name = path.stem
    if name not in open_clip.list_models():
        raise unknown_name("model", name, open_clip.list_models(), "open_clip models")
    tag = None if pretrained in (None, "", "none", "None", "random") else pretrained
    recorded = "none"
    if tag is not None:
        local = Path(tag).expanduser()
        if local.exists():
            tag = str(local.resolve())
            recorded = tag
        elif "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise PretrainedUnavailable(f"--pretrained {tag!r} looks like a file path but does not exist")
        else:
            known = open_clip.list_pretrained_tags_by_model(name)
            if tag not in known:
                raise PretrainedUnavailable(
                    f"{tag!r} is not a pretrained tag of {name}; its tags: {', '.join(known) or 'none'}; "
                    "or pass a local file: --pretrained /path/to/open_clip_pytorch_model.bin"
                )
            recorded = tag
    torch.manual_seed(seed)
    quiet = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs "Failed to download" before raising: the error below says it
    try:
        model = open_clip.create_model(name, pretrained=tag)
    except RuntimeError as error:
        if tag is not None and not Path(tag).exists():
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
            why = "offline mode (HF_HUB_OFFLINE is set)" if offline else "no network access or no cached copy"
            raise PretrainedUnavailable(
                f"the pretrained weights {tag!r} of {name} could not be fetched ({why}): {error}\n"
                f"Fetch them on a machine with internet access (open_clip.create_model({name!r}, "
                f"pretrained={tag!r}) fills the Hugging Face cache; copy ~/.cache/huggingface over), "
                "or pass a local file: --pretrained /path/to/open_clip_pytorch_model.bin"
            ) from None
        raise
    finally:
        logging.disable(quiet)
    return model.eval(), open_clip.get_tokenizer(name), name, recorded
