"""Paged attention in Triton: the CUDA implementation of the `AttentionBackend` seam (attention.py).

Same cache layout and metadata as the portable path: one layer's cache is `[num_blocks, block_size,
num_kv_heads, head_dim]`, decodes find their keys through `decode_block_tables`, prefill chunks through
their flat `slots` (cached prefix, then the chunk itself).

- Decode (flash-decoding): one program per (sequence, kv head, split of the context). A program loads the
  queries of all the heads that share its kv head (GQA: each key and value tile is read once per group, not
  once per query head), streams its split through an online softmax and writes a partial output with its
  log-sum-exp; a second kernel combines the splits. Splitting the context keeps the GPU busy when the batch
  is small and the contexts long (batch 1 with 8 kv heads is 8 programs without it).
- Prefill / extend: one launch for all the chunks of a step. A program takes a few consecutive tokens of one
  chunk times all the query heads of one kv head (again one key read per group), and walks the chunk's
  cached prefix plus itself under the causal mask.

Scores and the softmax run in fp32 (exp2, with log2(e) folded into the scale); fp32 inputs multiply in full
IEEE precision (no TF32), so an fp32 model on GPU computes what the torch path computes. Under
`TRITON_INTERPRET=1` the same kernels run on CPU tensors: tests/test_triton_kernels.py checks them against
`TorchPagedAttention` on machines without a GPU.

With kv_cache_dtype fp8 the cache holds e4m3 values of k / k_scale and v / v_scale (one scale per tensor):
the step's k/v are quantized as they are written, and the kernels widen each loaded tile to the model's
dtype (exact) and fold the scales into the scores (k) and the output (v), so the inner loops do no more
arithmetic than with a bf16 cache and read half the bytes.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .attention import AttentionMetadata
from .gpu_memory import FP8_KV_DTYPE
from .triton_layer_ops import to_dtype

LOG2E = 1.4426950408889634
DECODE_BLOCK_N = 32          # keys per tile in the decode kernel
DECODE_BLOCK_H = 16          # query-head rows per decode program (tl.dot needs M >= 16 on GPU)
MAX_SPLITS = 16              # context splits per decode sequence, at most
MIN_SPLIT_TOKENS = 256       # a split shorter than this costs more in the reduction than it saves
TARGET_PROGRAMS = 256        # decode programs that fill a large GPU (~2 per SM on an H100 / H200)
PREFILL_ROWS = 64            # (token, query head) rows per prefill program
PREFILL_BLOCK_N = 32         # keys per tile in the prefill kernel

# Triton's interpreter keeps bf16 as raw uint16 and its tl.dot multiplies those bit patterns
# (triton-lang/triton#11584, "not supported yet"); under it the kernels widen dot operands to fp32 first.
# bf16 -> fp32 is exact and tensor cores form the same exact products, so the arithmetic is the GPU's.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

FP8_MAX = 448.0                      # the largest finite e4m3 value (FP8_KV_DTYPE: kv_cache_dtype "fp8")


@triton.jit
def _dot(a, b, WIDEN: tl.constexpr):
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")   # fp32 operands in full precision, not TF32


@triton.jit
def _dequantized(x, DTYPE: tl.constexpr, KV_FP8: tl.constexpr):
    """A tile loaded from the cache in the model's dtype: fp8 (e4m3) widened through fp32, exactly (every e4m3
    value is a bf16 / fp16 value); its scale is folded into the scores (k) and the output (v)."""
    if KV_FP8:
        x = x.to(tl.float32).to(DTYPE)
    return x


@triton.jit
def _decode_split_kernel(
    Q, K, V, BlockTables, SeqLens, MidO, MidLse,
    qk_scale, v_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kp, stride_kh,
    stride_vb, stride_vp, stride_vh,
    stride_tb,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_BLOCKS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    WIDEN: tl.constexpr, KV_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_BLOCKS
    split = tl.program_id(2)
    h_in_group = (tl.program_id(1) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h_in_group < GROUP
    head = kv_head * GROUP + h_in_group
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    seq_len = tl.load(SeqLens + seq)
    # Splits are whole key tiles, so only a sequence's last tile is partial.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if end > start:
        q = tl.load(Q + seq * stride_qb + head[:, None] * stride_qh + d[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < end
            block = tl.load(BlockTables + seq * stride_tb + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            pos = n % BLOCK_SIZE
            k = tl.load(K + block[None, :] * stride_kb + pos[None, :] * stride_kp + kv_head * stride_kh + d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            k = _dequantized(k, Q.dtype.element_ty, KV_FP8)
            s = _dot(q, k, WIDEN) * qk_scale      # [BLOCK_H, BLOCK_N], in log2 units (k's scale folded in)
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            v = tl.load(V + block[:, None] * stride_vb + pos[:, None] * stride_vp + kv_head * stride_vh + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = _dequantized(v, Q.dtype.element_ty, KV_FP8)
            acc = acc * alpha[:, None] + _dot(to_dtype(p, v.dtype), v, WIDEN)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        tl.store(MidO + seq * stride_ob + head[:, None] * stride_oh + split * stride_os + d[None, :],
                 acc * (v_scale / l_i[:, None]), mask=h_ok[:, None] & d_ok[None, :])
        tl.store(MidLse + seq * stride_lb + head * stride_lh + split, m_i + tl.log2(l_i), mask=h_ok)


@triton.jit
def _decode_reduce_kernel(
    MidO, MidLse, SeqLens, Out,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m): the splits' softmaxes rescaled to one."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    s = tl.arange(0, SPLITS_P2)
    seq_len = tl.load(SeqLens + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    s_ok = (s < NUM_SPLITS) & (s * split_len < seq_len)     # the splits the first kernel wrote
    lse = tl.load(MidLse + seq * stride_lb + head * stride_lh + s, mask=s_ok, other=float("-inf"))
    o = tl.load(MidO + seq * stride_ob + head * stride_oh + s[:, None] * stride_os + d[None, :],
                mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    w = tl.exp2(lse - tl.max(lse, 0))                        # split 0 always holds keys: the max is finite
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(Out + seq * stride_outb + head * stride_outh + d, to_dtype(out, Out.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Chunks, Slots,
    qk_scale, v_scale,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_outt, stride_outh,
    GROUP: tl.constexpr, TOKENS: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, WIDEN: tl.constexpr,
    KV_FP8: tl.constexpr,
):
    """Rows of a program are (token, query head) pairs: TOKENS consecutive tokens of one chunk times the GROUP
    query heads of one kv head, token-major. Chunks is int64 [num_chunks, 4]: q_start, q_len, ctx_len and
    the offset of the chunk's ctx_len slots in Slots."""
    chunk = tl.program_id(0)
    kv_head = tl.program_id(1)
    t0 = tl.program_id(2) * TOKENS
    q_start = tl.load(Chunks + chunk * 4)
    q_len = tl.load(Chunks + chunk * 4 + 1)
    ctx_len = tl.load(Chunks + chunk * 4 + 2)
    slot0 = tl.load(Chunks + chunk * 4 + 3)
    if t0 < q_len:
        r = tl.arange(0, ROWS)
        tok = t0 + r // GROUP
        head = kv_head * GROUP + r % GROUP
        r_ok = (r < TOKENS * GROUP) & (tok < q_len)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        q = tl.load(Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = ctx_len - q_len + tok                    # the token's position: it sees keys 0..q_pos
        kv_end = tl.minimum(ctx_len, ctx_len - q_len + t0 + TOKENS)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        for n0 in range(0, kv_end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < kv_end
            slot = tl.load(Slots + slot0 + n, mask=n_ok, other=0)
            k = tl.load(K + slot[None, :] * stride_ks + kv_head * stride_kh + d[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            k = _dequantized(k, Q.dtype.element_ty, KV_FP8)
            s = _dot(q, k, WIDEN) * qk_scale
            # Key 0 is visible to every row, so each row's running max is finite after the first tile.
            s = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = _dequantized(v, Q.dtype.element_ty, KV_FP8)
            acc = acc * alpha[:, None] + _dot(to_dtype(p, v.dtype), v, WIDEN)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = acc * (v_scale / l_i[:, None])
        tl.store(Out + (q_start + tok)[:, None] * stride_outt + head[:, None] * stride_outh + d[None, :],
                 to_dtype(out, Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as e4m3 (round to nearest), saturated at +-FP8_MAX rather than overflowing to NaN."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def write_fp8(cache_flat: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: float) -> None:
    """cache_flat[slots] = quantize_fp8(x), through a byte view (index_put has no fp8 kernels everywhere)."""
    cache_flat.view(torch.uint8)[slots] = quantize_fp8(x, scale).view(torch.uint8)


def decode_splits(batch: int, num_kv_heads: int, max_context: int) -> int:
    """Context splits per decode sequence: enough programs to fill the GPU, none shorter than
    MIN_SPLIT_TOKENS, a power of two (each count is one compiled variant). Depends only on host-side sizes,
    so choosing it never waits for the GPU."""
    by_length = max(1, max_context // MIN_SPLIT_TOKENS)
    by_occupancy = max(1, -(-TARGET_PROGRAMS // max(1, batch * num_kv_heads)))
    splits = min(MAX_SPLITS, by_length, by_occupancy)
    return 1 << (splits.bit_length() - 1)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Decode attention over the paged cache, one query token per sequence.

    q: [B, Hq, D] (heads and dims may be strided views; the last axis contiguous); k_cache / v_cache:
    [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks] (int64 or int32, padded with any valid
    block); seq_lens: [B] keys visible to each sequence (>= 1). Writes into `out` ([B, Hq, D]) when given.
    `num_splits` fixes the split count (a CUDA graph needs it fixed); by default `decode_splits` picks it.
    An fp8 cache holds k / k_scale and v / v_scale (quantize_fp8)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    splits = num_splits or decode_splits(batch, num_kv_heads, block_tables.shape[1] * block_size)
    mid_o = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    head_blocks = triton.cdiv(group, DECODE_BLOCK_H)
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads * head_blocks, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse,
        scale * LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_BLOCKS=head_blocks, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=DECODE_BLOCK_H, BLOCK_N=DECODE_BLOCK_N, BLOCK_SIZE=block_size, NUM_SPLITS=splits,
        WIDEN=INTERPRETED, KV_FP8=k_cache.dtype == FP8_KV_DTYPE,
    )
    _decode_reduce_kernel[(batch, num_heads)](
        mid_o, mid_lse, seq_lens, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N,
        NUM_SPLITS=splits, SPLITS_P2=max(2, triton.next_power_of_2(splits)),
    )
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            chunks: torch.Tensor, slots: torch.Tensor, max_q_len: int, scale: float,
                            out: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Prefill / extend attention for every chunk of a step in one launch; writes the chunks' rows of `out`.

    q, out: [T, Hq, D] (the whole step's tokens); chunks: int64 [C, 4] rows (q_start, q_len, ctx_len,
    offset into `slots`); slots: int64, each chunk's ctx_len flat cache slots in position order, the chunk's
    own (already written) keys last. Token i of a chunk sits at position ctx_len - q_len + i and attends to
    keys 0..that position."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if chunks.shape[0] == 0:
        return out
    rows = max(PREFILL_ROWS, triton.next_power_of_2(group))
    tokens = rows // group
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    _prefill_kernel[(chunks.shape[0], num_kv_heads, triton.cdiv(max_q_len, tokens))](
        q, k_flat, v_flat, out, chunks, slots,
        scale * LOG2E * k_scale, v_scale,
        q.stride(0), q.stride(1),
        k_flat.stride(0), k_flat.stride(1),
        v_flat.stride(0), v_flat.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, TOKENS=tokens, ROWS=rows,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=PREFILL_BLOCK_N, WIDEN=INTERPRETED,
        KV_FP8=k_cache.dtype == FP8_KV_DTYPE,
    )
    return out


class TritonPagedAttention:
    """`AttentionBackend` over the Triton kernels: writes the step's k/v into the cache (as the torch path
    does, before any attention reads it), then one decode launch pair and one prefill launch.
    `decode_num_splits` fixes the decode split count (a captured CUDA graph replays one); None picks it per
    step from the batch and the block-table width. An fp8 cache (FP8_KV_DTYPE) stores k / k_scale and
    v / v_scale: one per-tensor scale each, 1.0 by default (vLLM's default too: Llama's keys and values sit
    well inside e4m3's +-448)."""

    def __init__(self, decode_num_splits: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0):
        self.decode_num_splits = decode_num_splits
        self.k_scale, self.v_scale = k_scale, v_scale

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_flat = k_cache.view(-1, k_cache.shape[2], k_cache.shape[3])
        v_flat = v_cache.view(-1, v_cache.shape[2], v_cache.shape[3])
        if k_cache.dtype == FP8_KV_DTYPE:
            write_fp8(k_flat, meta.slot_mapping, k, self.k_scale)
            write_fp8(v_flat, meta.slot_mapping, v, self.v_scale)
        else:
            k_flat[meta.slot_mapping] = k
            v_flat[meta.slot_mapping] = v
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        out = torch.empty_like(q)
        if meta.num_decode:
            paged_decode_attention(q[:meta.num_decode], k_cache, v_cache, meta.decode_block_tables,
                                   meta.decode_seq_lens, scale, out=out[:meta.num_decode],
                                   num_splits=self.decode_num_splits, **scales)
        if meta.prefills:
            chunks, slots, max_q_len = meta.prefill_index
            paged_prefill_attention(q, k_cache, v_cache, chunks, slots, max_q_len, scale, out, **scales)
        return out
