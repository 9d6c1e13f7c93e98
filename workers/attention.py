"""Attention over a paged KV cache, for a mixed batch of decode tokens and prefill chunks.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`; a
sequence's keys live in the blocks its block table lists. `AttentionMetadata` describes one step's
batch: the first `num_decode` tokens are single-token decodes, the rest are prefill chunks (each attends to
its cached prefix plus itself, causally). No padding to the longest prompt.

Decodes run through the compiled CPU kernel when it is available (cpu_kernels.py: reads the paged cache in
place). The portable path attends decodes in groups of similar context length (`DecodeGroup`, built once
per step and shared by every layer): each group gathers its keys by flat cache slot and runs one SDPA,
padding only to the longest context inside the group.

`AttentionBackend` is what the model calls. `TorchPagedAttention` (gather + SDPA) runs anywhere; on CUDA
`TritonPagedAttention` (triton_attention.py: flash-decoding over the block tables, one launch for all the
prefill chunks) implements the same `forward(q, k, v, k_cache, v_cache, meta, scale)` over the same cache
layout. HERD_TRITON_ATTENTION=0 keeps the portable path on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

DECODE_GROUP_SIZE = 8


@dataclass
class PrefillChunk:
    q_start: int          # index of the chunk's first token in the flat batch
    q_len: int            # tokens computed this step
    ctx_len: int          # keys visible to the chunk's last token (cached prefix + this chunk)
    slots: torch.Tensor   # [ctx_len] flat cache slots of those keys, in position order


@dataclass
class DecodeGroup:
    rows: torch.Tensor    # [g] which decode tokens (indices into the batch's first num_decode tokens)
    slots: torch.Tensor   # [g, max_len] flat cache slots of each sequence's keys (padding points at slot 0)
    mask: torch.Tensor    # [g, 1, 1, max_len] True where a key is real


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # [T] flat cache slot where each new token's k/v is written
    num_decode: int                   # the first num_decode tokens are one-token decodes
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] (padded with block 0)
    decode_seq_lens: torch.Tensor     # [num_decode] keys visible to each decode token
    prefills: list[PrefillChunk]
    block_size: int = 16
    _groups: list[DecodeGroup] | None = None
    _prefill_index: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @property
    def decode_groups(self) -> list[DecodeGroup]:
        """Length-sorted decode groups for the portable path, built once per step (shared by all layers)."""
        if self._groups is None:
            self._groups = build_decode_groups(self.decode_block_tables, self.decode_seq_lens, self.block_size)
        return self._groups

    @property
    def prefill_index(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The prefill chunks packed for one kernel launch, built once per step (shared by all layers):
        int64 [num_chunks, 4] rows (q_start, q_len, ctx_len, offset of the chunk's slots), every chunk's
        slots concatenated, and the longest q_len (a host int: sizing the launch never waits for the GPU)."""
        if self._prefill_index is None:
            offsets, rows = 0, []
            for c in self.prefills:
                rows.append((c.q_start, c.q_len, c.ctx_len, offsets))
                offsets += c.ctx_len
            device = self.slot_mapping.device
            slots = torch.cat([c.slots for c in self.prefills]) if self.prefills else torch.zeros(0, dtype=torch.long)
            self._prefill_index = (host_to_device(rows, device).view(-1, 4), slots.to(device=device, dtype=torch.long),
                                   max((c.q_len for c in self.prefills), default=0))
        return self._prefill_index


def host_to_device(values: list, device: torch.device) -> torch.Tensor:
    """Host ints as a long tensor on `device`. On CUDA through pinned memory without blocking: this runs in the
    middle of a step, and a copy from pageable memory would wait for all the work already queued."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions [0, length) for one block table (long tensor)."""
    pos = torch.arange(length, device=block_table.device)
    return block_table[pos // block_size] * block_size + pos % block_size


def build_decode_groups(tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                        group_size: int = DECODE_GROUP_SIZE) -> list[DecodeGroup]:
    order = torch.argsort(seq_lens)
    groups = []
    for g0 in range(0, len(order), group_size):
        rows = order[g0:g0 + group_size]
        lens = seq_lens[rows]
        max_len = int(lens.max())
        pos = torch.arange(max_len, device=tables.device)
        slots = tables[rows][:, pos // block_size] * block_size + pos % block_size
        mask = (pos.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        groups.append(DecodeGroup(rows, slots, mask))
    return groups


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchPagedAttention:
    """Portable paged attention: scatter new k/v into the cache, gather each sequence's keys, SDPA."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]. Every token's k/v is written before any attention reads it.
        k_flat = k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])
        v_flat = v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])
        k_flat[meta.slot_mapping] = k
        v_flat[meta.slot_mapping] = v
        out = torch.empty_like(q)
        if meta.num_decode:
            out[:meta.num_decode] = self._decode(q[:meta.num_decode], k_cache, v_cache, k_flat, v_flat, meta, scale)
        for chunk in meta.prefills:
            sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            out[sl] = self._prefill(q[sl], k_flat, v_flat, chunk, scale)
        return out

    def _decode(self, q, k_cache, v_cache, k_flat, v_flat, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        for g in meta.decode_groups:
            keys = k_flat[g.slots].transpose(1, 2)      # [g, Hkv, L, D]
            values = v_flat[g.slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(q[g.rows].unsqueeze(2), keys, values, attn_mask=g.mask,
                                               scale=scale, enable_gqa=True)
            out[g.rows] = o.squeeze(2)
        return out

    @staticmethod
    def _prefill(q, k_flat, v_flat, chunk: PrefillChunk, scale: float) -> torch.Tensor:
        # 4-D [1, heads, tokens, D]: torch's fused CPU (flash) SDPA kernel takes only batched input; a 3-D
        # call falls back to the unfused math path, ~3-4x slower here.
        keys = k_flat[chunk.slots].transpose(0, 1).unsqueeze(0)     # [1, Hkv, ctx_len, D]
        values = v_flat[chunk.slots].transpose(0, 1).unsqueeze(0)
        query = q.transpose(0, 1).unsqueeze(0)                     # [1, Hq, n, D]
        if chunk.q_len == chunk.ctx_len:
            o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # The chunk's i-th token sits at position ctx_len - q_len + i and sees keys up to it.
            q_pos = torch.arange(chunk.ctx_len - chunk.q_len, chunk.ctx_len, device=q.device).unsqueeze(1)
            mask = torch.arange(chunk.ctx_len, device=q.device).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return o[0].transpose(0, 1)


class CpuPagedAttention(TorchPagedAttention):
    """Decodes through the compiled CPU kernel (reads the paged cache in place); prefill as the portable path."""

    def __init__(self, kernel):
        self.kernel = kernel

    def _decode(self, q, k_cache, v_cache, k_flat, v_flat, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        return self.kernel.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                                  meta.decode_seq_lens, scale)


def triton_enabled(switch: str) -> bool:
    """Whether the Triton kernels may run: the environment switch (`switch`=0 turns them off) and an
    importable triton (it ships with PyTorch's CUDA wheels)."""
    if os.environ.get(switch, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_attention_backend(device: torch.device) -> AttentionBackend:
    """The fastest backend available for `device`: the Triton kernels on CUDA, the compiled CPU decode
    kernel on the CPU, else the portable gather + SDPA path."""
    if device.type == "cuda" and triton_enabled("HERD_TRITON_ATTENTION"):
        from .triton_attention import TritonPagedAttention
        return TritonPagedAttention()
    if device.type == "cpu":
        from .cpu_kernels import cpu_kernel_module
        kernel = cpu_kernel_module()
        if kernel is not None:
            return CpuPagedAttention(kernel)
    return TorchPagedAttention()
