"""Processes of a sharded run: rank, world size and the few collectives the loop needs."""

from __future__ import annotations

import datetime
import os

import torch


class DistContext:
    """Rank and world size; collectives are no-ops in a single process."""

    def __init__(self, rank: int = 0, world: int = 1, owns_group: bool = False):
        self.rank, self.world, self.owns_group = rank, world, owns_group

    @classmethod
    def from_env(cls) -> "DistContext":
        """torchrun's RANK / WORLD_SIZE; a gloo group (CPU tensors only ever travel)."""
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
            owns = True
        return cls(dist.get_rank(), dist.get_world_size(), owns)

    @property
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", self.rank))

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            values = values.clone()
            dist.all_reduce(values)
        return values

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False
