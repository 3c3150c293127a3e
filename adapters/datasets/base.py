"""What every test set is: a registered `DatasetInfo` (layout, loader, prompt settings) and an
`EvalDataset` of (image in [0,1], label); the errors a loader raises; the sample selection."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from atpt_plugin.registry import Registry

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetLayoutError(FileNotFoundError):
    """The dataset is missing or does not have the expected layout."""


class BadImageError(Exception):
    """An image file that exists but cannot be read or decoded; names the file and the sample.

    `index` and `sample_id` are set by the dataset, `position` (in the evaluated selection)
    by the evaluation loop.
    """

    def __init__(self, path, reason: str, index: Optional[int] = None, sample_id: Optional[str] = None):
        super().__init__(str(path), reason)
        self.path, self.reason, self.index, self.sample_id = str(path), reason, index, sample_id
        self.position: Optional[int] = None

    def __str__(self) -> str:
        where = [
            f"sample {self.position} of the run" if self.position is not None else "",
            f"dataset index {self.index}" if self.index is not None else "",
            f"id {self.sample_id!r}" if self.sample_id is not None else "",
        ]
        where = ", ".join(w for w in where if w)
        return f"could not read image {self.path}" + (f" ({where})" if where else "") + f": {self.reason}"

    def as_dict(self) -> Dict[str, object]:
        return {
            "position": self.position,
            "index": self.index,
            "id": self.sample_id,
            "path": self.path,
            "reason": self.reason,
        }


def json_digest(value, length: int = 16) -> str:
    """A short stable hash of a JSON-serialisable value (settings, class names, sample lists)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


DATASETS = Registry("dataset", "atpt_plugin.datasets")


@dataclass(frozen=True)
class DatasetInfo:
    """How one dataset is laid out on disk, how it is loaded and what its prompts need.

    A package adds a dataset by publishing a `DatasetInfo` (or a callable returning one)
    under the entry-point group `atpt_plugin.datasets`; `loader(info, root, split,
    image_size)` returns an `EvalDataset` (`root` is None when `needs_root` is False).
    """

    key: str
    title: str
    kind: str  # the layout family: "split_json", "aircraft", "imagenet", "imagefolder", ...
    loader: Callable[..., "EvalDataset"]
    layout: str  # the expected tree, for error messages and `atpt list`
    dirs: Tuple[str, ...] = ()  # candidate dataset folders under the data root (CoOp, TPT)
    image_dir: str = ""  # image root inside the dataset folder
    split_file: str = ""
    domain_word: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    imagenet_variant: str = ""  # "", "a", "r", "v2", "sketch"
    augmix_ops: bool = True  # TPT convention: no AugMix ops on the ImageNet family
    needs_root: bool = True
    splits: Optional[Tuple[str, ...]] = None  # None: any split the files name; else the only ones

    def adapter_overrides(self) -> Dict[str, object]:
        """Settings the TPT / A-TPT code applies for this dataset."""
        overrides: Dict[str, object] = {}
        if self.domain_word:
            overrides["domain_word"] = self.domain_word
        if not self.augmix_ops:
            overrides["augmix_ops"] = False
        return overrides


class EvalDataset(Dataset):
    """Labelled test images as (3, S, S) tensors in [0,1]; `classnames[label]` names each label."""

    def __init__(
        self,
        info: DatasetInfo,
        root: Path,
        split: str,
        samples: List[Tuple[str, int]],
        classnames: List[str],
        image_root: Path,
        image_size: Optional[int] = 224,
    ):
        self.info = info
        self.root = root
        self.split = split
        self.samples = samples  # (path relative to image_root, label)
        self.classnames = classnames
        self.image_root = image_root
        self.image_size = image_size

    name = property(lambda self: self.info.key)
    domain_word = property(lambda self: self.info.domain_word)

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return (
            f"EvalDataset({self.info.title}, split={self.split!r}, {len(self)} images, "
            f"{len(self.classnames)} classes, root={str(self.root)!r})"
        )

    def sample_id(self, index: int) -> str:
        return self.samples[index][0]

    def label(self, index: int) -> int:
        return self.samples[index][1]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        relative, label = self.samples[index]
        try:
            return load_image(self.image_root / relative, self.image_size, self.info), label
        except BadImageError as error:
            error.index, error.sample_id = index, relative
            raise

    def fingerprint(self) -> str:
        """Hash of the class names and the (path, label) list: what the samples are."""
        return json_digest([self.classnames, self.samples])


def load_image(path: Path, image_size: Optional[int], info: Optional[DatasetInfo] = None) -> torch.Tensor:
    """The image as a (3, S, S) tensor; `BadImageError` when the file cannot be read or decoded."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except FileNotFoundError:
        layout = f"; expected layout: {info.layout}" if info else ""
        raise DatasetLayoutError(f"image {path} listed by the dataset does not exist{layout}") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadImageError(path, f"{type(error).__name__}: {error}") from None
    if image_size is not None:
        image = TF.resize(image, image_size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [image_size, image_size])
    return TF.to_tensor(image)


def select(dataset_size: int, n_examples: Optional[int], seed: int) -> List[int]:
    """The evaluated indices: the first `n_examples` of a seeded permutation (all when None).

    A permutation, not the first N files: split files list images class by class. The
    order for a given seed is fixed, so a smaller N is a prefix of a larger one.
    """
    if n_examples is not None and (isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1):
        raise ValueError(f"n_examples must be a positive integer or None (all), got {n_examples!r}")
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed)).tolist()
    return order if n_examples is None else order[:n_examples]
