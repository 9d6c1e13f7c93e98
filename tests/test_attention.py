"""The compiled CPU decode kernel and the portable gather + SDPA path agree on a paged cache.

Head dims 64 and 128 take the kernel's compile-time (AVX-512 where the CPU has it) path, 32 the generic
one; one sequence alone splits its kv heads across threads, several take one task per sequence."""
import pytest
import torch

from workers.attention import AttentionMetadata, CpuPagedAttention, TorchPagedAttention
from workers.cpu_kernels import cpu_kernel_module


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("hq, hkv", [(8, 8), (8, 2)])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("lens", [[1, 17, 40, 16, 33], [70]])
def test_cpu_kernel_matches_portable_path(dtype, tol, hq, hkv, d, lens):
    kernel = cpu_kernel_module()
    assert kernel is not None, "the CPU kernel must build on the CI machine (gcc + ninja are dependencies)"
    g = torch.Generator().manual_seed(0)
    blocks, bs = 64, 16
    k_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(blocks, bs, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(blocks, generator=g).tolist()
    tables, used = [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[used:used + nb])
        used += nb
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    # The new tokens' k/v are the last positions; write them where the cache already is (slot of pos len-1).
    slots = torch.tensor([tables[i][(n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens)])
    k_new = k_cache.view(-1, hkv, d)[slots].clone()
    v_new = v_cache.view(-1, hkv, d)[slots].clone()
    meta = AttentionMetadata(slots, len(lens), table_t, torch.tensor(lens), [], bs)
    ref = TorchPagedAttention().forward(q, k_new, v_new, k_cache, v_cache, meta, d ** -0.5)
    meta2 = AttentionMetadata(slots, len(lens), table_t, torch.tensor(lens), [], bs)
    out = CpuPagedAttention(kernel).forward(q, k_new, v_new, k_cache, v_cache, meta2, d ** -0.5)
    assert torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("bs", [5, 32])
def test_cpu_kernel_any_block_size(bs):
    """Block sizes other than 16 (the cache layout follows EngineConfig.block_size)."""
    kernel = cpu_kernel_module()
    g = torch.Generator().manual_seed(bs)
    hkv, hq, d, lens = 2, 4, 64, [3, bs, 2 * bs + 1, 40]
    k_cache = torch.randn(40, bs, hkv, d, generator=g)
    v_cache = torch.randn(40, bs, hkv, d, generator=g)
    width = -(-max(lens) // bs)
    tables = torch.randperm(40, generator=g)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), hq, d, generator=g)
    out = kernel.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lens), d ** -0.5)
    for i, n in enumerate(lens):
        pos = torch.arange(n)
        slots = tables[i][pos // bs] * bs + pos % bs
        k = k_cache.view(-1, hkv, d)[slots].transpose(0, 1)
        v = v_cache.view(-1, hkv, d)[slots].transpose(0, 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i].unsqueeze(1), k, v, scale=d ** -0.5,
                                                               enable_gqa=True).squeeze(1)
        assert torch.allclose(out[i], ref, atol=1e-5, rtol=1e-5)


def test_cpu_kernels_reject_out_of_range_indices():
    """The kernels read raw pointers; indices outside the tensors are errors, not out-of-bounds reads."""
    kernel = cpu_kernel_module()
    cache = torch.zeros(4, 16, 2, 64)
    q = torch.zeros(1, 2, 64)
    with pytest.raises(RuntimeError, match="block id"):
        kernel.paged_decode_attention(q, cache, cache, torch.tensor([[7]]), torch.tensor([5]), 0.125)
    with pytest.raises(RuntimeError, match="length"):
        kernel.paged_decode_attention(q, cache, cache, torch.tensor([[1]]), torch.tensor([17]), 0.125)
    table = torch.zeros(8, 32)
    with pytest.raises(RuntimeError, match="position"):
        kernel.rotary_(torch.zeros(2, 2, 64), table, table, torch.tensor([0, 8]))
