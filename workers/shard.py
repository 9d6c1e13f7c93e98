"""Which part of the model one process holds: its tensor-parallel rank and pipeline stage.

The single-process engine is the degenerate case (tp_size = pp_size = 1, `LocalGroup`). The parallel
executor (workers/parallel/) gives every shard worker its own `ShardInfo` and a torch.distributed-backed
`TPGroup`; the model code is the same in both cases.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ContextManager, Protocol, Sequence

from .config import ModelConfig, dtype_bytes
from .errors import CheckpointError

if TYPE_CHECKING:                     # annotations only: herd plan does this arithmetic without torch
    import torch


class TPGroup(Protocol):
    """Collectives over the ranks of one tensor-parallel group.

    A CUDA graph records the collectives of the forward it captures (workers/cuda_graphs.py): `capture_safe`
    says whether this group has collectives a capture may record, `graph_mode()` routes the collectives issued
    inside it to them, and `check_same(value)` raises on every rank unless all passed the same value (it is
    also a rendezvous: no rank returns before every rank has called it)."""

    capture_safe: bool

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor: ...

    def graph_mode(self) -> ContextManager[None]: ...

    def check_same(self, value: int, what: str) -> None: ...


class LocalGroup:
    """A tensor-parallel group of one: collectives are identities (and trivially capture-safe)."""

    capture_safe = True

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return t

    def graph_mode(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def check_same(self, value: int, what: str) -> None:
        pass


@dataclass(frozen=True)
class ShardInfo:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    layer_start: int = 0
    layer_end: int = -1  # exclusive; -1 = through the last layer

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layers(self, cfg: ModelConfig) -> range:
        end = cfg.num_hidden_layers if self.layer_end < 0 else self.layer_end
        return range(self.layer_start, end)

    # --- Megatron-style slices of this rank -------------------------------------------------------
    def q_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        n = cfg.num_attention_heads // self.tp_size
        return self.tp_rank * n, (self.tp_rank + 1) * n

    def kv_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        """KV heads of this rank. With more ranks than kv heads, ranks share (replicate) a kv head."""
        n_kv = cfg.num_key_value_heads
        if self.tp_size <= n_kv:
            per = n_kv // self.tp_size
            return self.tp_rank * per, (self.tp_rank + 1) * per
        head = self.tp_rank // (self.tp_size // n_kv)
        return head, head + 1

    def intermediate(self, cfg: ModelConfig) -> tuple[int, int]:
        n = cfg.intermediate_size // self.tp_size
        return self.tp_rank * n, (self.tp_rank + 1) * n

    def vocab(self, cfg: ModelConfig) -> tuple[int, int]:
        """Vocabulary rows of this rank; every rank holds `padded` rows (the last may be partly padding)."""
        per = self.vocab_per_rank(cfg)
        return self.tp_rank * per, min(cfg.vocab_size, (self.tp_rank + 1) * per)

    def vocab_per_rank(self, cfg: ModelConfig) -> int:
        return -(-cfg.vocab_size // self.tp_size)


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Reject TP sizes the model cannot be split into, with the reason."""
    if tp < 1:
        raise CheckpointError(f"tensor_parallel_size must be >= 1, got {tp}")
    if cfg.num_attention_heads % tp:
        raise CheckpointError(f"tensor_parallel_size {tp} must divide num_attention_heads {cfg.num_attention_heads}")
    n_kv = cfg.num_key_value_heads
    if (tp <= n_kv and n_kv % tp) or (tp > n_kv and tp % n_kv):
        raise CheckpointError(f"tensor_parallel_size {tp} and num_key_value_heads {n_kv} must divide one another")
    if cfg.intermediate_size % tp:
        raise CheckpointError(f"tensor_parallel_size {tp} must divide intermediate_size {cfg.intermediate_size}")


def partition_layers(num_layers: int, pp: int, partition: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) layer ranges per pipeline stage: an even split (earlier stages take the remainder)
    unless an explicit `partition` (layers per stage) is given."""
    if pp < 1:
        raise CheckpointError(f"pipeline_parallel_size must be >= 1, got {pp}")
    if partition is None:
        if pp > num_layers:
            raise CheckpointError(f"pipeline_parallel_size {pp} exceeds num_hidden_layers {num_layers}")
        base, extra = divmod(num_layers, pp)
        partition = [base + (1 if i < extra else 0) for i in range(pp)]
    partition = list(partition)
    if len(partition) != pp or sum(partition) != num_layers or min(partition) < 1:
        raise CheckpointError(
            f"pp_layer_partition {partition} must have {pp} positive entries summing to {num_layers} layers")
    ranges, start = [], 0
    for n in partition:
        ranges.append((start, start + n))
        start += n
    return ranges


def kv_block_bytes(cfg: ModelConfig, shard: ShardInfo, block_size: int, dtype: "str | torch.dtype") -> int:
    """Bytes one KV block takes on this shard (its layers, its kv heads, K and V)."""
    k0, k1 = shard.kv_heads(cfg)
    return 2 * len(shard.layers(cfg)) * block_size * (k1 - k0) * cfg.head_dim * dtype_bytes(dtype)
