"""torch.distributed for one shard group: NCCL on CUDA, gloo on the CPU, the same code path.

Every rank of the group joins one process group (world = TP × PP, rank = pp_rank × TP + tp_rank); each
pipeline stage's TP ranks get a sub-group for their all-reduce / all-gather. Every collective carries the
process-group timeout, so a dead peer becomes an error instead of a hang.
"""
from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TorchDistGroup:
    """TPGroup over a torch.distributed sub-group (one pipeline stage's tensor-parallel ranks)."""

    def __init__(self, group, size: int):
        self.group = group
        self.size = size

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts, dim=dim)


def init_shard_group(*, master_addr: str, master_port: int, rank: int, tp_size: int, pp_size: int,
                     device: torch.device, timeout_s: float) -> TorchDistGroup:
    """Join the shard group's process group and return this rank's stage TP group."""
    world = tp_size * pp_size
    dist.init_process_group(backend=backend_for(device), init_method=f"tcp://{master_addr}:{master_port}",
                            world_size=world, rank=rank, timeout=datetime.timedelta(seconds=timeout_s))
    mine = None
    for stage in range(pp_size):  # every rank must create every sub-group, in the same order
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks=ranks, timeout=datetime.timedelta(seconds=timeout_s))
        if rank in ranks:
            mine = group
    return TorchDistGroup(mine, tp_size)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
