"""kv_cache_dtype fp8: the e4m3 KV cache with per-tensor scales (workers/triton_attention.py).

The attention kernels run under Triton's interpreter (which loads and widens e4m3 as a GPU does) in the worker
process of tests/test_triton_kernels.py, against the portable attention over the dequantized cache: the same
keys and values the kernels see, in the model's dtype."""
from __future__ import annotations


import pytest
import torch

from test_triton_kernels import (GQA, Batch, assert_close, compile_for_hopper, interpreted_kernels,  # noqa: F401
                                 interpreter, run_with_the_compiler)  # interpreter: the fixture, shared
from workers.attention import TorchPagedAttention
from workers.triton_attention import FP8_KV_DTYPE, FP8_MAX, quantize_fp8, write_fp8

K_SCALE, V_SCALE = 0.5, 2.0
HOPPER_SHARED_MEMORY = 227 * 1024


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return (x.float() * scale).to(dtype)


def check_fp8_against_dequantized(dtype, block_size, head_dim, q_heads, kv_heads, decode_lens, chunks, seed,
                                  num_splits=None):
    attention, _ = interpreted_kernels()
    batch = Batch(dtype, block_size, head_dim, q_heads, kv_heads, decode_lens, chunks, seed)
    k8, v8 = quantize_fp8(batch.k_cache, K_SCALE), quantize_fp8(batch.v_cache, V_SCALE)
    backend = attention.TritonPagedAttention(decode_num_splits=num_splits, k_scale=K_SCALE, v_scale=V_SCALE)
    out = backend.forward(batch.q, batch.k, batch.v, k8, v8, batch.meta(), head_dim ** -0.5)
    # The reference: the dequantized cache, and the step's own k/v as the fp8 cache stores them.
    k_ref, v_ref = dequantize(k8, K_SCALE, dtype), dequantize(v8, V_SCALE, dtype)
    k_new = dequantize(quantize_fp8(batch.k, K_SCALE), K_SCALE, dtype)
    v_new = dequantize(quantize_fp8(batch.v, V_SCALE), V_SCALE, dtype)
    ref = TorchPagedAttention().forward(batch.q, k_new, v_new, k_ref, v_ref, batch.meta(), head_dim ** -0.5)
    assert k8.dtype == FP8_KV_DTYPE
    assert torch.equal(dequantize(k8, K_SCALE, dtype), k_ref) and torch.equal(dequantize(v8, V_SCALE, dtype), v_ref)
    assert_close(out, ref, dtype, tol={torch.float32: 1e-4, torch.bfloat16: 2e-2})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gqa, head_dim, block_size", [(1, 64, 16), (4, 128, 32), (8, 64, 16)])
def test_fp8_cache_matches_the_dequantized_reference(interpreter, dtype, gqa, head_dim, block_size):
    """A mixed step (decodes, a prefill chunk after a cached prefix, a fresh prompt) over an fp8 cache."""
    interpreter(check_fp8_against_dequantized, dtype, block_size, head_dim, *GQA[gqa], [1, 33, 300],
                [(20, 90), (17, 17)], gqa + head_dim)


def test_fp8_decode_splits(interpreter):
    interpreter(check_fp8_against_dequantized, torch.bfloat16, 16, 64, 4, 1, [700, 5], [], 3, num_splits=4)


def test_quantize_saturates_and_rounds():
    x = torch.tensor([1000.0, -1000.0, 3.3, 0.0, -0.1])
    q = quantize_fp8(x, 1.0)
    assert q.dtype == FP8_KV_DTYPE
    assert q.float().tolist() == [FP8_MAX, -FP8_MAX, 3.25, 0.0, pytest.approx(-0.1015625)]
    assert quantize_fp8(x, 4.0).float()[2].item() == 0.8125           # 3.3 / 4 = 0.825 -> nearest e4m3


def test_write_fp8_puts_the_quantized_rows_in_their_slots():
    cache = torch.zeros(10, 2, 4, dtype=FP8_KV_DTYPE)
    rows = torch.randn(3, 2, 4)
    write_fp8(cache, torch.tensor([7, 2, 5]), rows, 0.5)
    assert torch.equal(cache[[7, 2, 5]].float(), quantize_fp8(rows, 0.5).float())
    assert cache[[0, 1, 3, 4, 6, 8, 9]].float().abs().sum() == 0


def check_fp8_kernels_compile_for_hopper() -> dict[str, int]:
    """The attention kernels over an e4m3 cache through Triton's whole compiler for sm_90 (no GPU needed), at
    Llama 3 8B's attention shape; returns each kernel's shared memory."""
    import triton

    from workers import triton_attention as ta
    assert not ta.INTERPRETED

    group, head_dim, block_size = 4, 128, 16
    types = dict(Q="*bf16", K="*fp8e4nv", V="*fp8e4nv", Out="*bf16", BlockTables="*i64", SeqLens="*i64",
                 MidO="*fp32", MidLse="*fp32", Chunks="*i64", Slots="*i64", qk_scale="fp32", v_scale="fp32")
    rows = max(ta.PREFILL_ROWS, triton.next_power_of_2(group))
    return {
        "decode": compile_for_hopper(ta._decode_split_kernel, types, dict(
            GROUP=group, HEAD_BLOCKS=1, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_H=ta.DECODE_BLOCK_H,
            BLOCK_N=ta.DECODE_BLOCK_N, BLOCK_SIZE=block_size, NUM_SPLITS=8, WIDEN=False, KV_FP8=True)),
        "prefill": compile_for_hopper(ta._prefill_kernel, types, dict(
            GROUP=group, TOKENS=rows // group, ROWS=rows, HEAD_DIM=head_dim, BLOCK_D=head_dim,
            BLOCK_N=ta.PREFILL_BLOCK_N, WIDEN=False, KV_FP8=True)),
    }


@pytest.mark.slow
def test_fp8_kernels_compile_for_a_gpu():
    """What the interpreter cannot tell: that the compiler takes the e4m3 loads and widening for Hopper."""
    shared = run_with_the_compiler(check_fp8_kernels_compile_for_hopper)
    assert set(shared) == {"decode", "prefill"}
    assert max(shared.values()) <= HOPPER_SHARED_MEMORY, shared
