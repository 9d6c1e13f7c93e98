"""Attention over a paged KV cache, for a mixed batch of decode tokens and prefill chunks.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads, head_dim]`; a
sequence's keys live in the blocks its block table lists. `AttentionMetadata` describes one step's
batch: the first `num_decode` tokens are single-token decodes (batched together), the rest are prefill
chunks (each attends to its cached prefix plus itself, causally). No padding to the longest prompt.

This is the seam for a CUDA kernel: `AttentionBackend` is what the model calls. `TorchPagedAttention`
(gather + SDPA) runs anywhere; on GPU a flash-attn / flashinfer paged kernel can implement the same
`forward(q, k, v, k_cache, v_cache, meta)` over the same cache layout and metadata.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    q_start: int          # index of the chunk's first token in the flat batch
    q_len: int            # tokens computed this step
    ctx_len: int          # keys visible to the chunk's last token (cached prefix + this chunk)
    block_ids: torch.Tensor  # the sequence's block table (long), covering ctx_len


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor        # [T] flat cache slot where each new token's k/v is written
    num_decode: int                   # the first num_decode tokens are one-token decodes
    decode_block_tables: torch.Tensor  # [num_decode, max_blocks] (padded with 0)
    decode_seq_lens: torch.Tensor     # [num_decode] keys visible to each decode token
    prefills: list[PrefillChunk]


class AttentionBackend(Protocol):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor: ...


class TorchPagedAttention:
    """Portable paged attention: scatter new k/v into the cache, gather each sequence's keys, SDPA."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # q: [T, Hq, D]; k, v: [T, Hkv, D]
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k
        v_cache.view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v
        out = torch.empty_like(q)
        if meta.num_decode:
            out[:meta.num_decode] = self._decode(q[:meta.num_decode], k_cache, v_cache, meta, scale)
        for chunk in meta.prefills:
            sl = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            out[sl] = self._prefill(q[sl], k_cache, v_cache, chunk, scale)
        return out

    @staticmethod
    def _gather(cache: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
        # [nblocks, bs, H, D] -> [H, length, D]
        return cache[block_ids].flatten(0, 1)[:length].transpose(0, 1)

    def _prefill(self, q, k_cache, v_cache, chunk: PrefillChunk, scale: float) -> torch.Tensor:
        keys = self._gather(k_cache, chunk.block_ids, chunk.ctx_len)
        values = self._gather(v_cache, chunk.block_ids, chunk.ctx_len)
        query = q.transpose(0, 1)  # [Hq, n, D]
        if chunk.q_len == chunk.ctx_len:
            o = F.scaled_dot_product_attention(query, keys, values, is_causal=True, scale=scale, enable_gqa=True)
        else:
            # The chunk's i-th token sits at position ctx_len - q_len + i and sees keys up to it.
            q_pos = torch.arange(chunk.ctx_len - chunk.q_len, chunk.ctx_len, device=q.device).unsqueeze(1)
            mask = torch.arange(chunk.ctx_len, device=q.device).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        # Pad only inside attention (to the longest context among decodes), masked by length.
        bs = k_cache.shape[1]
        max_len = int(meta.decode_seq_lens.max())
        nblk = (max_len + bs - 1) // bs
        tables = meta.decode_block_tables[:, :nblk]
        keys = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)    # [B, Hkv, L, D]
        values = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        mask = (torch.arange(max_len, device=q.device).unsqueeze(0) < meta.decode_seq_lens.unsqueeze(1))[:, None, None, :]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.squeeze(2)
