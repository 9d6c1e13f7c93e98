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

CUDA graphs (workers/cuda_graphs.py) record a TP shard's all-reduces too, and a blocking wait cannot be
recorded: it polls the collective's CUDA event from the host, which a stream capture forbids (and which would
never complete, since nothing runs during a capture). So when a shard group decodes from graphs
(`ShardComm.agree_on_graphs`), each TP group gets a twin sub-group over the same ranks, created with
`TORCH_NCCL_BLOCKING_WAIT=0` (ProcessGroupNCCL reads it once, when it is constructed): its `wait()` is a
stream-on-event wait, and PyTorch skips its watchdog for collectives issued while a stream captures. Only the
forwards a graph captures (and their eager warm-ups) use it (`TorchDistGroup.graph_mode`); every eager step
keeps the blocking group. Inside a replayed graph no per-collective timeout applies: a dead peer stalls the
GPU, and the driver's step deadline (`collective_timeout_s`, ray_executor.py) turns that into an error.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator

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
    """`TPGroup` over a torch.distributed sub-group: one pipeline stage's tensor-parallel ranks.

    `graph_group`, once set (ShardComm.agree_on_graphs), is a capture-safe twin of `group` over the same ranks;
    inside `graph_mode()` the collectives go there (what a CUDA graph records and replays)."""

    def __init__(self, group, size: int, device: torch.device | None = None, graph_group=None):
        self.group = group
        self.size = size
        self.device = device or torch.device("cpu")      # where this group's own small tensors live
        self.graph_group = graph_group
        self.in_graph_mode = False

    @property
    def capture_safe(self) -> bool:
        return self.graph_group is not None

    def _active(self):
        return self.graph_group if self.in_graph_mode else self.group

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._active())
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self._active())
        return torch.cat(parts, dim=dim)

    @contextlib.contextmanager
    def graph_mode(self) -> Iterator[None]:
        """Collectives issued inside go to the capture-safe group."""
        if self.graph_group is None:
            raise RuntimeError("this TP group has no capture-safe twin (ShardComm.agree_on_graphs makes it)")
        self.in_graph_mode = True
        try:
            yield
        finally:
            self.in_graph_mode = False

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless every rank passed the same `value`. The host waits for the answer, so it
        is a rendezvous too: no rank returns before all have called it."""
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group if self.graph_group is None else self.graph_group)
        high, neg_low = t.tolist()
        if high != -neg_low:
            raise RuntimeError(f"the TP ranks of this stage disagree on {what} ({-neg_low} vs {high})")


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
    device: torch.device | None = None            # where collectives' tensors live (None: no process group)
    tp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    timeout: datetime.timedelta | None = None

    def agree_on_graphs(self, requested: int) -> int:
        """The largest decode-graph batch of the whole shard group: the minimum of what each shard `requested`
        (cuda_graphs.requested_max_batch; 0 = the whole group decodes eagerly). Every shard calls this once,
        at the same point of its setup, before its KV cache is sized (ShardWorker.init). When the group
        captures and has TP, every stage's TP group gets its capture-safe twin here, and its communicator is
        set up now (a first collective), so that the KV cache is sized with its buffers already allocated."""
        if self.device is None:
            return requested
        t = torch.tensor([requested], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        agreed = int(t.item())
        if agreed > 0 and self.tp_group is not None:
            self.tp_group.graph_group = each_stage_tp_group(
                self.tp_size, self.pp_size, self.pp_rank,
                lambda ranks: new_capture_safe_group(ranks, self.timeout, self.backend))
            self.tp_group.check_same(agreed, "the decode graphs' largest batch")
        return agreed


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


def each_stage_tp_group(tp_size: int, pp_size: int, pp_rank: int, make: Callable[[list[int]], object]):
    """Every rank creates every stage's TP sub-group with `make(ranks)`, in the same order (torch.distributed
    requires it of every rank, member or not); returns this rank's stage's."""
    mine = None
    for stage in range(pp_size):
        group = make([global_rank(t, stage, tp_size) for t in range(tp_size)])
        if stage == pp_rank:
            mine = group
    return mine


BLOCKING_WAIT_VARS = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")   # the name and its old alias


@contextlib.contextmanager
def _blocking_wait_off() -> Iterator[None]:
    """Only the variables that are set change, and only their values: the environment's table is not resized
    under the feet of threads that read it (NCCL's and torch's own)."""
    saved = {name: os.environ[name] for name in BLOCKING_WAIT_VARS if name in os.environ}
    os.environ.update({name: "0" for name in saved})
    try:
        yield
    finally:
        os.environ.update(saved)


def new_capture_safe_group(ranks: list[int], timeout: datetime.timedelta | None, backend: str):
    """A sub-group whose collectives a CUDA graph can record: on NCCL, one constructed without blocking wait
    (see the module docstring); on gloo (no graphs), a plain sub-group, so the CPU tests run the same code."""
    kwargs = {"timeout": timeout} if timeout is not None else {}
    if backend != "nccl":
        return dist.new_group(ranks=ranks, backend=backend, **kwargs)
    with _blocking_wait_off():
        return dist.new_group(ranks=ranks, backend=backend, **kwargs)


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
    own_device = kwargs.get("device_id", torch.device("cpu"))
    tp_group = None
    if tp_size > 1:
        group = each_stage_tp_group(tp_size, pp_size, pp_rank,
                                    lambda ranks: dist.new_group(ranks=ranks, timeout=timeout, backend=backend))
        tp_group = TorchDistGroup(group, tp_size, own_device)
    pipe = PipeLink(prev_rank=global_rank(tp_rank, pp_rank - 1, tp_size) if pp_rank > 0 else None,
                    next_rank=global_rank(tp_rank, pp_rank + 1, tp_size) if pp_rank < pp_size - 1 else None)
    return ShardComm(tp_group, pipe, backend, own_device, tp_size, pp_size, pp_rank, timeout)
