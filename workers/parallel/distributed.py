"""torch.distributed for one shard group: NCCL on CUDA, gloo on the CPU, one code path for both.

Every shard of a TP × PP group joins one process group (world = TP·PP, global rank = pp_rank·TP + tp_rank).
Two things travel over it:

- tensor-parallel collectives: each pipeline stage's TP ranks get a sub-group (`new_group`) for the
  all-reduce / all-gather that Megatron-style TP needs (`TorchDistGroup`, the model's `TPGroup`);
- pipeline activations: stage p's TP rank t sends its hidden states straight to stage p+1's TP rank t
  (`PipeLink`). After the stage's last all-reduce every TP rank holds the same hidden states, so the pairs
  spread the transfer over TP links instead of funnelling it through one rank, the driver, or the object
  store (docs/parallel.md has the measurements behind this choice).

Every collective and every send/recv carries the process-group timeout: a dead peer is an error (gloo
notices a closed connection at once; a hung one times out), never a hang. On CUDA, `TORCH_NCCL_BLOCKING_WAIT`
makes NCCL raise in the calling thread at the timeout instead of leaving a stream blocked forever.
"""
from __future__ import annotations

import datetime
import os
import socket
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port(host: str = "") -> int:
    """A TCP port that is free on this machine now (for the process group's rendezvous store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def global_rank(tp_rank: int, pp_rank: int, tp_size: int) -> int:
    return pp_rank * tp_size + tp_rank


class TorchDistGroup:
    """`TPGroup` over a torch.distributed sub-group: one pipeline stage's tensor-parallel ranks."""

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


@dataclass
class PipeLink:
    """Point-to-point activation transfer between neighbouring pipeline stages (same TP rank)."""
    prev_rank: int | None   # global rank this shard receives hidden states from (None: first stage)
    next_rank: int | None   # global rank this shard sends hidden states to (None: last stage)

    def recv(self, num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = torch.empty((num_tokens, hidden_size), dtype=dtype, device=device)
        dist.recv(buf, src=self.prev_rank)
        return buf

    def send(self, hidden: torch.Tensor) -> None:
        # Synchronous on gloo (returns once the bytes are handed over); NCCL enqueues on the stream and keeps
        # the tensor alive itself. Either way the next micro-batch can start right after.
        dist.send(hidden.contiguous(), dst=self.next_rank)


@dataclass
class ShardComm:
    tp_group: TorchDistGroup | None   # None when TP = 1 (the model then uses LocalGroup)
    pipe: PipeLink
    backend: str


def rendezvous(addresses: list[tuple[str, str, int]]) -> str:
    """The process group's init_method from every shard's (node id, IP, free port), rank 0 first.

    Shards that all share one node meet through a file (torch's FileStore): no port is opened, where a TCPStore
    server listens on every interface of the machine whatever address it is given. Shards on several nodes
    meet at rank 0's node, at a port that was free there."""
    if len({node for node, _, _ in addresses}) == 1:
        return f"file:///tmp/herd-rendezvous-{uuid.uuid4().hex}"
    _, ip, port = addresses[0]
    return f"tcp://{ip}:{port}"


def remove_rendezvous_file(init_method: str) -> None:
    """Delete a FileStore rendezvous file (shard actors are killed, so torch's own clean-up never runs)."""
    if init_method.startswith("file://"):
        try:
            os.remove(init_method[len("file://"):])
        except FileNotFoundError:
            pass


def init_shard_group(*, init_method: str, tp_rank: int, pp_rank: int, tp_size: int,
                     pp_size: int, device: torch.device, timeout_s: float) -> ShardComm:
    """Join the shard group's process group; return this shard's TP sub-group and pipeline links."""
    backend = backend_for(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    rank = global_rank(tp_rank, pp_rank, tp_size)
    kwargs = {}
    if backend == "nccl":
        # Block in wait() and raise there at the timeout (the default only lets the watchdog kill the process).
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend=backend, init_method=init_method,
                            world_size=tp_size * pp_size, rank=rank, timeout=timeout, **kwargs)
    tp_group = None
    if tp_size > 1:
        for stage in range(pp_size):  # every rank creates every sub-group, in the same order
            ranks = [global_rank(t, stage, tp_size) for t in range(tp_size)]
            group = dist.new_group(ranks=ranks, timeout=timeout, backend=backend)
            if stage == pp_rank:
                tp_group = TorchDistGroup(group, tp_size)
    pipe = PipeLink(prev_rank=global_rank(tp_rank, pp_rank - 1, tp_size) if pp_rank > 0 else None,
                    next_rank=global_rank(tp_rank, pp_rank + 1, tp_size) if pp_rank < pp_size - 1 else None)
    return ShardComm(tp_group, pipe, backend)
