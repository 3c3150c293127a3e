"""The embedded default: a small CLIP trained here on Fashion-MNIST, and a held-out test subset.

Importing this package registers the model config with open_clip, so the shipped
checkpoint loads like any other open_clip model:

    import open_clip, atpt_plugin.demo_model as demo
    model = open_clip.create_model(demo.MODEL_NAME, pretrained=str(demo.checkpoint_path()))
    tokenizer = open_clip.get_tokenizer(demo.MODEL_NAME)

or in one call: `model, tokenizer, classnames = load_demo_model()`. The weights come from
`python -m atpt_plugin.demo_model.train` (seeded; see that module). This is a toy setting
(32x32 grey garments, 10 classes), not the paper's ViT-B/16 on fine-grained photographs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import open_clip
import torch

from .data import CLASSNAMES, to_model_input

MODEL_NAME = "fmnist-vit-tiny"
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
CONTEXT = "a photo of a"  # the zero-shot prompt: "a photo of a {classname}."

if MODEL_NAME not in open_clip.list_models():
    open_clip.add_model_config(CONFIG_DIR)


def checkpoint_path() -> Path:
    """The shipped weights (fp16 state dict; open_clip loads them into the fp32 model)."""
    return PACKAGE_DIR / "weights" / f"{MODEL_NAME}.pt"


def subset_path() -> Path:
    """The shipped held-out subset of the official Fashion-MNIST test split."""
    return PACKAGE_DIR / "data" / "fmnist_test_1000.npz"


def image_size() -> int:
    return int(open_clip.get_model_config(MODEL_NAME)["vision_cfg"]["image_size"])


def load_demo_model(checkpoint=None, device="cpu"):
    """(model in eval mode, tokenizer, classnames) of the demo CLIP, fp32 on `device`."""
    path = Path(checkpoint) if checkpoint is not None else checkpoint_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"no demo checkpoint at {path}; train one with `python -m atpt_plugin.demo_model.train`"
        )
    model = open_clip.create_model(MODEL_NAME, pretrained=str(path), device=device)
    return model.eval(), open_clip.get_tokenizer(MODEL_NAME), list(CLASSNAMES)


def load_demo_subset(n: Optional[int] = None, path=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float [0,1] (N,3,S,S) at the model's input size, labels int64 (N,)).

    The first n images hold n/10 of each class (the file is ordered round-robin by class).
    """
    with np.load(path or subset_path()) as data:
        images, labels = data["images"], data["labels"]
    if n is not None:
        if not 0 < n <= len(labels):
            raise ValueError(f"n must be in 1..{len(labels)}, got {n}")
        images, labels = images[:n], labels[:n]
    return to_model_input(images, image_size()), torch.as_tensor(labels, dtype=torch.int64)


__all__ = [
    "MODEL_NAME",
    "CLASSNAMES",
    "CONTEXT",
    "checkpoint_path",
    "subset_path",
    "image_size",
    "load_demo_model",
    "load_demo_subset",
]
