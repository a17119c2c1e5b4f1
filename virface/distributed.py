"""The distributed context a stage runs in, passed in rather than read from globals.

Nothing here creates a process group: a launcher (torchrun, Ray Train) does, and the stage loop
only asks whether one exists. Single-process runs use rank 0 of 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class DistributedContext:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls, device: torch.device | str = "auto") -> "DistributedContext":
        """Rank and world size of the process group a launcher set up, if any."""
        device = resolve_device(device) if isinstance(device, str) else device
        if dist.is_available() and dist.is_initialized():
            return cls(device, dist.get_rank(), dist.get_world_size())
        return cls(device)

    def all_gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (n, ...) tensor along dim 0; gradients flow back to each rank."""
        if not self.is_distributed:
            return x
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average .grad over ranks in one flat all-reduce (for parameters DDP does not own)."""
        if not self.is_distributed:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            x = x.clone()
            dist.all_reduce(x)
        return x

    def broadcast_object(self, obj):
        """rank 0's ``obj`` on every rank."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
