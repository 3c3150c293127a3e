"""Fashion-MNIST for the demo CLIP: IDX reading, model inputs, augmentation, the shipped subset.

The official split has 60,000 training and 10,000 test images (28x28 grey, uint8). The
training script reads only the training files for training; the shipped subset is drawn
from the test files, so it is disjoint from training by construction.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

CLASSNAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path) -> np.ndarray:
    """An IDX file (optionally gzipped): magic 0x0000TTDD, D big-endian uint32 sizes, data."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape).astype(data.dtype.newbyteorder("="), copy=True)


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz); for tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as handle:
        handle.write(header + array.tobytes())


def _find(data_dir: Path, name: str) -> Optional[Path]:
    for candidate in (
        data_dir / name,
        data_dir / f"{name}.gz",
        data_dir / "FashionMNIST" / "raw" / name,
        data_dir / "FashionMNIST" / "raw" / f"{name}.gz",
    ):
        if candidate.is_file():
            return candidate
    return None


def load_split(split: str, data_dir=None, download: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,28,28), labels int64 (N,)) of the official `split` ("train" or "test").

    Looks in `data_dir` (default: the Debian package's folder) for the IDX files, plain or
    gzipped, also in torchvision's FashionMNIST/raw layout. With `download=True` and no
    files found, torchvision downloads them into `data_dir` (needs internet).
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else DEBIAN_DIR
    prefix = SPLIT_PREFIX[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    paths = [_find(data_dir, n) for n in names]
    if None in paths and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(data_dir), train=split == "train", download=True)
        paths = [_find(data_dir, n) for n in names]
    if None in paths:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files {names} not found in {data_dir}; install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or pass --download to let "
            "torchvision fetch them"
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int64)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"unexpected shapes {images.shape} and {labels.shape} in {data_dir}")
    return images, labels


def to_model_input(images, size: int) -> torch.Tensor:
    """uint8 grey (N,H,W) -> float [0,1] (N,3,size,size): bilinear resize, grey repeated to RGB."""
    x = torch.as_tensor(np.asarray(images)).float().div_(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous()


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale=(0.25, 1.0),
    ratio=(3 / 4, 4 / 3),
    p_crop: float = 0.8,
    p_flip: float = 0.5,
) -> torch.Tensor:
    """Batched RandomResizedCrop + horizontal flip of (N,C,H,W) [0,1] images to `size`.

    One affine resampling per image (bilinear, like the resize of `to_model_input`); an image
    left uncropped (probability 1 - p_crop) is exactly the plain resize, possibly flipped.
    """
    n = images.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the full side
    height = (area / aspect).sqrt().clamp(max=1.0)
    keep = torch.rand(n, generator=generator) >= p_crop
    width[keep], height[keep] = 1.0, 1.0
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)  # normalised [-1,1] coords
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < p_flip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(theta.to(images), (n, images.shape[1], size, size), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp_(0, 1)


def build_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of `per_class` images of each class, drawn with `seed`, ordered round-robin
    over classes (so any prefix of length n*C holds n images of each class)."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    chosen = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} images, fewer than per_class={per_class}")
        chosen.append(np.sort(rng.choice(members, per_class, replace=False)))
    return np.stack(chosen, axis=1).reshape(-1)  # (per_class, C) -> round-robin


def save_subset(path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, seed: int) -> None:
    """The shipped subset: uint8 images at native size, labels, and their indices in the split."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        images=images[indices].astype(np.uint8),
        labels=labels[indices].astype(np.uint8),
        test_indices=indices.astype(np.int32),
        classnames=np.asarray(CLASSNAMES),
        split=np.asarray("test"),
        seed=np.asarray(seed),
    )
