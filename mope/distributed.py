"""Data-parallel training under torchrun: each rank rolls out its shard, DDP all-reduces PCM gradients."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA (one GPU per
    local rank). Without torchrun, a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=device)
    on_cuda = device.startswith("cuda")
    if on_cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def shard_bounds(n: int, info: DistInfo) -> tuple[int, int]:
    """This rank's contiguous slice [start, end) of n items; n must split evenly."""
    if n % info.world_size:
        raise ValueError(f"batch_size {n} must be a multiple of the number of ranks {info.world_size}")
    size = n // info.world_size
    return info.rank * size, (info.rank + 1) * size


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks (through the rank's device, as nccl needs), on ``tensor``'s device."""
    if info.world_size == 1:
        return tensor
    reduced = tensor.to(info.device)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(tensor.device)
