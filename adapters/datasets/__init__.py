"""Test sets in the layouts the CoOp / TPT code bases use, with class names and domain words.

`load_dataset(name, root)` accepts either the data root that holds one folder per dataset
(CoOp's `DATA/`, TPT's `data_root`) or the dataset's own folder. Every dataset yields
`(image, label)` with `image` a (3, S, S) float tensor in [0,1]: Resize(S, bicubic) +
CenterCrop(S), the model's own preprocessing without normalisation (the adapters
normalise inside). A dataset that is missing or malformed raises `DatasetLayoutError`
naming the expected layout; `describe_layout(name)` prints it. An image file that is
there but cannot be read or decoded raises `BadImageError` naming the file and the sample,
so the evaluation can stop with a clear message or skip that sample.

Class names come from the dataset's own files (split file, `variants.txt`) with
underscores read as spaces, as CoOp's prompt learner does; the ImageNet family uses
CLIP's curated ImageNet class names (shipped by open_clip) indexed by the WordNet ids
shipped by timm. ImageNet-A and -R use their official 200-class subsets.

The domain word is what the authors' A-TPT code inserts into "a photo of a" for the
fine-grained sets ("a pet photo of a" for Pets); `None` keeps the plain phrase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .base import (
    DATASETS,
    IMAGE_EXTENSIONS,
    BadImageError,
    DatasetInfo,
    DatasetLayoutError,
    EvalDataset,
    json_digest,
    load_image,
    select,
)
from .layouts import DemoDataset, imagenet_classnames, imagenet_wnids  # importing registers the built-ins


def _as_info(target) -> DatasetInfo:
    info = target if isinstance(target, DatasetInfo) else target()
    if not isinstance(info, DatasetInfo):
        raise TypeError(
            f"a dataset entry must be an atpt_plugin.adapters.datasets.DatasetInfo (or a callable "
            f"returning one), got {type(info).__name__}"
        )
    return info


def dataset_info(name: str) -> DatasetInfo:
    """The registered dataset `name` (a key, a title or an alias, case-insensitive)."""
    wanted = name.strip().lower().replace(" ", "")
    if wanted in DATASETS:
        return _as_info(DATASETS.get(wanted))
    for entry in DATASETS.entries().values():
        info = _as_info(entry.load())
        if wanted in {info.key, info.title.lower(), *info.aliases}:
            return info
    raise DATASETS.unknown(name)


def describe_layout(name: str) -> str:
    info = dataset_info(name)
    return f"{info.title} ({info.key}): {info.layout}"


def load_dataset(name: str, root, split: str = "test", image_size: Optional[int] = 224) -> EvalDataset:
    """The `split` of dataset `name` under `root` (the data root or the dataset folder itself).

    image_size: the model's input size S (Resize + CenterCrop); None keeps the original size.
    """
    info = dataset_info(name)
    if not info.needs_root:
        return info.loader(info, None, split, image_size)
    if root is None:
        raise DatasetLayoutError(f"{info.title} needs --data-root (data_dir); expected layout: {info.layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(
            f"data root {str(root)!r} is not a directory; expected layout for {info.title}: {info.layout}"
        )
    if info.splits is not None and split not in info.splits:
        raise ValueError(
            f"{info.title} has only the {', '.join(map(repr, info.splits))} split here "
            f"(its evaluation set), got {split!r}"
        )
    return info.loader(info, root, split, image_size)


__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "DatasetInfo",
    "DatasetLayoutError",
    "DemoDataset",
    "EvalDataset",
    "dataset_info",
    "describe_layout",
    "imagenet_classnames",
    "imagenet_wnids",
    "json_digest",
    "load_dataset",
    "load_image",
    "select",
]
