"""What an evaluation iterates: positions of a dataset selection or of in-memory tensors."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


class DatasetSource:
    """Positions 0..N-1 of a selection of an `EvalDataset`."""

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, position: int) -> Tuple[torch.Tensor, int]:
        return self.dataset[self.indices[position]]

    def sample_id(self, position: int) -> str:
        return self.dataset.sample_id(self.indices[position])

    def label(self, position: int) -> int:
        """The dataset's label, without reading the image."""
        return int(self.dataset.label(self.indices[position]))


class TensorSource:
    """Positions of in-memory tensors x (N,3,H,W) in [0,1] and labels y (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
            raise ValueError(f"expected x (N,3,H,W) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return len(self.x)

    def get(self, position: int):
        return self.x[position], int(self.y[position])

    def sample_id(self, position: int) -> str:
        return str(position)

    def label(self, position: int) -> int:
        return int(self.y[position])
