"""The Triton kernels of the CUDA path (triton_attention.py, triton_layer_ops.py) compute what the portable
torch path computes. No GPU here: they run on CPU tensors under Triton's interpreter. Triton reads
TRITON_INTERPRET=1 when it decorates a kernel, its own library functions included, at `import triton`; in a
test run something else (torch._dynamo, via transformers) has usually imported triton already. So the
kernel cases (`check_*`) run in one worker process that has the variable set from its start (`interpreter`
fixture); the selection tests run here, and the compile test in a second worker without the interpreter.

The interpreter runs every program of a launch in Python, so the cases use few heads and many lengths:
lengths around block (16, 32), key-tile (32) and split boundaries, GQA ratios 1/4/8, head dims 64/128,
fp32 and bf16, decodes and prefill chunks with cached prefixes in one batch. The interpreter does not run
Triton's compiler; test_kernels_compile_for_a_gpu does (for sm_90, no GPU needed)."""
from __future__ import annotations

import inspect
import multiprocessing
import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from tests.checkpoints import LLAMA3_GQA_TIED, make_checkpoint  # noqa: E402
from workers.attention import (  # noqa: E402
    AttentionMetadata, PrefillChunk, TorchPagedAttention, context_slots, select_attention_backend)
from workers.layer_ops import TorchLayerOps, select_layer_ops  # noqa: E402
from workers.triton_attention import TritonPagedAttention, decode_splits  # noqa: E402
from workers.triton_layer_ops import TritonLayerOps  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
GQA = {1: (2, 2), 4: (4, 1), 8: (8, 1)}   # ratio -> (query heads, kv heads)


def worker_pool(interpret: bool):
    """A fresh process, with TRITON_INTERPRET=1 from its start or without it (a process reads its
    environment when it starts)."""
    previous = os.environ.pop("TRITON_INTERPRET", None)
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return multiprocessing.get_context("spawn").Pool(1)
    finally:
        os.environ.pop("TRITON_INTERPRET", None)
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous


def compile_for_hopper(kernel, types: dict, constexprs: dict) -> int:
    """Compile one kernel for sm_90 with Triton's real compiler (arguments not in `types` are i32, those in
    `constexprs` constants); its shared memory in bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).metadata.shared


def run_with_the_compiler(check):
    """check() in a fresh process where Triton compiles for real (no interpreter); its result."""
    pool = worker_pool(interpret=False)
    try:
        return pool.apply(check)
    finally:
        pool.close()
        pool.join()


@pytest.fixture(scope="module")
def interpreter():
    """run(check, *args, **kwargs): check(...) in the interpreter's process (its failures are raised here)."""
    pool = worker_pool(interpret=True)
    yield lambda check, *args, **kwargs: pool.apply(check, args, kwargs)
    pool.close()
    pool.join()


def interpreted_kernels():
    """The kernel modules, in the worker process (their kernels decorated under the interpreter)."""
    from workers import triton_attention, triton_layer_ops
    assert triton_attention.INTERPRETED, "the worker must start with TRITON_INTERPRET=1"
    return triton_attention, triton_layer_ops


class Batch:
    """A mixed step over a scattered paged cache: decodes (the new token is each sequence's last position)
    then prefill chunks (q_len new tokens after a cached prefix), q/k/v as the strided views of one fused
    projection, as the model hands them over."""

    def __init__(self, dtype, block_size, head_dim, q_heads, kv_heads, decode_lens, chunks, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.block_size, self.head_dim, self.dtype = block_size, head_dim, dtype
        lens = list(decode_lens) + [ctx for _, ctx in chunks]
        num_blocks = sum(-(-n // block_size) for n in lens) + 2
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=g).to(dtype)
        self.v_cache = torch.randn(shape, generator=g).to(dtype)
        perm, used, tables = torch.randperm(num_blocks, generator=g).tolist(), 0, []
        for n in lens:
            tables.append(perm[used:used - (-n // block_size)])
            used += len(tables[-1])
        tokens = len(decode_lens) + sum(q for q, _ in chunks)
        qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=g)
        qkv[:, :q_heads * head_dim] *= 2                    # sharper softmaxes than unit-variance scores
        qkv = qkv.to(dtype)
        q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        self.q = q.view(tokens, q_heads, head_dim)
        self.k, self.v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
        slot_mapping = [t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                        for t, n in zip(tables, decode_lens)]
        self.prefills, start = [], len(decode_lens)
        for (q_len, ctx), table in zip(chunks, tables[len(decode_lens):]):
            slots = context_slots(torch.tensor(table), ctx, block_size)
            slot_mapping += slots[ctx - q_len:].tolist()
            self.prefills.append(PrefillChunk(start, q_len, ctx, slots))
            start += q_len
        width = max([len(t) for t in tables[:len(decode_lens)]], default=1)
        self.tables = torch.tensor([t + [0] * (width - len(t)) for t in tables[:len(decode_lens)]],
                                   dtype=torch.long).view(-1, width)
        self.decode_lens = torch.tensor(decode_lens, dtype=torch.long)
        self.slot_mapping = torch.tensor(slot_mapping, dtype=torch.long)

    def meta(self) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping, len(self.decode_lens), self.tables, self.decode_lens,
                                 self.prefills, self.block_size)

    def run(self, backend):
        """(output, k cache, v cache) after `backend.forward` on a copy of the cache."""
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        out = backend.forward(self.q, self.k, self.v, k_cache, v_cache, self.meta(), self.head_dim ** -0.5)
        return out, k_cache, v_cache


def assert_close(out, ref, dtype, tol=TOL):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert torch.allclose(out.float(), ref.float(), atol=tol[dtype], rtol=tol[dtype]), f"max error {err}"


# ---- attention (check_* run in the interpreter's process) ---------------------------------------------

def check_against_torch(*batch_args, num_splits=None):
    attention, _ = interpreted_kernels()
    batch = Batch(*batch_args)
    out, k_cache, v_cache = batch.run(attention.TritonPagedAttention(decode_num_splits=num_splits))
    ref, k_ref, v_ref = batch.run(TorchPagedAttention())
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)    # the step's k/v written in place
    assert_close(out, ref, batch.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_mixed_batch_matches_torch(interpreter, dtype, gqa, head_dim, block_size):
    """Decodes of lengths around block and key-tile boundaries, then prefill chunks: a whole prompt, a chunk
    after a cached prefix, a one-token extend, a chunk longer than a prefill program's token rows."""
    bs = block_size
    decode_lens = [1, 2, bs - 1, bs, bs + 1, 2 * bs + 3, 95, 161]
    chunks = [(9, 9), (13, 2 * bs + 13), (1, bs + 1), (70, 70 + bs - 3)]
    interpreter(check_against_torch, dtype, bs, head_dim, *GQA[gqa], decode_lens, chunks, gqa + head_dim + bs)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("gqa", [1, 8])
def test_decode_only_and_prefill_only_steps(interpreter, block_size, gqa):
    interpreter(check_against_torch, torch.float32, block_size, 64, *GQA[gqa], [7, 40, 1], [], 1, num_splits=3)
    interpreter(check_against_torch, torch.float32, block_size, 64, *GQA[gqa], [], [(5, 5), (3, 60)], 2)


def test_head_dim_and_group_that_are_not_powers_of_two(interpreter):
    """Head dim 80 (masked to a 128-wide tile), 3 query heads per kv head (a prefill program's rows do not
    divide evenly into tokens)."""
    interpreter(check_against_torch, torch.float32, 16, 80, 6, 2, [1, 17, 70], [(30, 30), (25, 50)], 4)


def check_splits(num_splits):
    attention, _ = interpreted_kernels()
    b = Batch(torch.float32, 16, 64, 4, 1, [1, 31, 33, 100, 257, 300], [], seed=3)
    _, k_cache, v_cache = b.run(TorchPagedAttention())      # the cache with this step's keys in it
    ref = TorchPagedAttention().forward(b.q, b.k, b.v, k_cache.clone(), v_cache.clone(), b.meta(), 0.125)
    out = attention.paged_decode_attention(b.q, k_cache, v_cache, b.tables, b.decode_lens, 0.125,
                                           num_splits=num_splits)
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_decode_splits_combine_to_one_softmax(interpreter, num_splits):
    """Any number of context splits (power of two or not, more splits than a short sequence has key tiles)
    gives the one-pass result: the reduction rescales each split's softmax by its log-sum-exp."""
    interpreter(check_splits, num_splits)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, block_size, head_dim, gqa", [
    (torch.float32, 16, 128, 4), (torch.bfloat16, 32, 64, 8), (torch.bfloat16, 16, 64, 1)],
    ids=["fp32-16-128-4", "bf16-32-64-8", "bf16-16-64-1"])
def test_long_contexts(interpreter, dtype, block_size, head_dim, gqa):
    """Thousands of keys: decodes split 8-16 ways (split edges fall inside blocks), a long prefill chunk
    after a long cached prefix. Each block size, head dim, GQA ratio and dtype once (the interpreter takes
    ~7 s a case; the short cases above take the full cross product)."""
    decode_lens = [4096 - 5, 2049, 1000]
    width = -(-max(decode_lens) // block_size)
    assert decode_splits(len(decode_lens), GQA[gqa][1], width * block_size) >= 8
    interpreter(check_against_torch, dtype, block_size, head_dim, *GQA[gqa], decode_lens, [(40, 1500)], 7)


def test_decode_splits_fill_the_gpu_without_short_splits():
    assert decode_splits(1, 8, 4096) == 16                 # batch 1: 8 programs -> split 16 ways
    assert decode_splits(1, 8, 512) == 2                   # but no split shorter than MIN_SPLIT_TOKENS
    assert decode_splits(1, 8, 100) == 1
    assert decode_splits(256, 8, 4096) == 1                # a big batch fills the GPU by itself
    assert decode_splits(8, 8, 8192) == 4                  # 64 programs x 4 = TARGET_PROGRAMS
    assert all(s & (s - 1) == 0 for s in (decode_splits(b, 2, 3000) for b in range(1, 40)))


# ---- layer ops ---------------------------------------------------------------------------------------

LAYER_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def check_rms_norm(dtype):
    _, layer_ops = interpreted_kernels()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 200, generator=g) * 3).to(dtype)
    delta = torch.randn(9, 200, generator=g).to(dtype)
    w = torch.randn(200, generator=g).to(dtype)
    ops, ref = layer_ops.TritonLayerOps(), TorchLayerOps()
    assert_close(ops.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5), dtype, LAYER_TOL)
    normed, total = ops.add_rms_norm(x, delta, w, 1e-6)
    ref_normed, ref_total = ref.add_rms_norm(x, delta, w, 1e-6)
    assert torch.equal(total, ref_total)                  # the residual stream itself is exact
    assert_close(normed, ref_normed, dtype, LAYER_TOL)


@DTYPES
def test_rms_norm_and_residual_add(interpreter, dtype):
    interpreter(check_rms_norm, dtype)


def check_rotary(dtype, head_dim):
    _, layer_ops = interpreted_kernels()
    g = torch.Generator().manual_seed(1)
    q_heads, kv_heads, tokens = 4, 2, 6
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    angles = torch.rand(300, head_dim // 2, generator=g) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    positions = torch.tensor([0, 5, 2, 299, 17, 17])
    q = qkv[:, :q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim:(q_heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    ref_q = TorchLayerOps.rotary(q.clone(), cos, sin, positions)
    ref_k = TorchLayerOps.rotary(k.clone(), cos, sin, positions)
    v_before = qkv[:, (q_heads + kv_heads) * head_dim:].clone()
    ops = layer_ops.TritonLayerOps()
    out_q, out_k = ops.rotary(q, cos, sin, positions), ops.rotary(k, cos, sin, positions)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()   # rotated where they lie
    assert_close(out_q, ref_q, dtype, LAYER_TOL)
    assert_close(out_k, ref_k, dtype, LAYER_TOL)
    assert torch.equal(qkv[:, (q_heads + kv_heads) * head_dim:], v_before)          # v untouched


@DTYPES
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_in_place_on_the_q_and_k_views(interpreter, dtype, head_dim):
    interpreter(check_rotary, dtype, head_dim)


def check_silu_mul(dtype):
    _, layer_ops = interpreted_kernels()
    g = torch.Generator().manual_seed(2)
    inter = layer_ops.SILU_BLOCK + 37                      # a row spans two programs
    gate_up = (torch.randn(5, 2 * inter, generator=g) * 4).to(dtype)
    assert_close(layer_ops.TritonLayerOps().silu_mul(gate_up), TorchLayerOps.silu_mul(gate_up), dtype, LAYER_TOL)


@DTYPES
def test_silu_mul(interpreter, dtype):
    interpreter(check_silu_mul, dtype)


# ---- selection (here: nothing runs a kernel) ---------------------------------------------------------

CUDA = torch.device("cuda")   # only passed to the selection functions: nothing here touches CUDA


def test_cuda_selects_the_triton_kernels(monkeypatch):
    monkeypatch.delenv("HERD_TRITON_ATTENTION", raising=False)
    monkeypatch.delenv("HERD_TRITON_LAYER_OPS", raising=False)
    assert isinstance(select_attention_backend(CUDA), TritonPagedAttention)
    assert isinstance(select_layer_ops(CUDA), TritonLayerOps)


def test_environment_switches_turn_them_off(monkeypatch):
    monkeypatch.setenv("HERD_TRITON_ATTENTION", "0")
    monkeypatch.setenv("HERD_TRITON_LAYER_OPS", "1")
    assert type(select_attention_backend(CUDA)) is TorchPagedAttention
    assert isinstance(select_layer_ops(CUDA), TritonLayerOps)
    monkeypatch.setenv("HERD_TRITON_ATTENTION", "1")
    monkeypatch.setenv("HERD_TRITON_LAYER_OPS", "0")
    assert isinstance(select_attention_backend(CUDA), TritonPagedAttention)
    assert type(select_layer_ops(CUDA)) is TorchLayerOps


def test_without_triton_cuda_keeps_the_portable_paths(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)     # `import triton` raises ImportError
    assert type(select_attention_backend(CUDA)) is TorchPagedAttention
    assert type(select_layer_ops(CUDA)) is TorchLayerOps


# ---- the engine on the Triton path -------------------------------------------------------------------

def check_engine(path, prompts):
    """Greedy tokens of the portable path and of the Triton path (attention and layer ops), chunked prefill so
    that steps mix decodes with chunks extending a cached prefix."""
    import workers.model_runner as model_runner
    from workers import Engine, SamplingParams
    attention, layer_ops = interpreted_kernels()
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    tokens = []
    for backend, ops in ((TorchPagedAttention, TorchLayerOps),
                         (attention.TritonPagedAttention, layer_ops.TritonLayerOps)):
        model_runner.select_attention_backend = lambda device, backend=backend: backend()
        model_runner.select_layer_ops = lambda device, ops=ops: ops()
        engine = Engine.from_pretrained(path, dtype="float32", show_progress=False, max_num_batched_tokens=12)
        try:
            tokens.append([o.token_ids for o in engine.generate(prompts, params)])
            assert type(engine.executor.runner.model.ops) is ops
        finally:
            engine.shutdown()
    return tokens


@pytest.mark.slow
def test_engine_greedy_tokens_equal_the_portable_path(interpreter, tmp_path):
    path = make_checkpoint(tmp_path, "gqa", LLAMA3_GQA_TIED)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 640, (n,), generator=g).tolist() for n in (5, 30, 1)]
    portable, triton_path = interpreter(check_engine, str(path), prompts)
    assert triton_path == portable


# ---- compiled for a GPU, without one ------------------------------------------------------------------

def check_compiles_for_hopper() -> dict[str, int]:
    """Each kernel through Triton's whole compiler (TTIR, TTGIR, LLVM, PTX, and the bundled ptxas to a cubin)
    for sm_90, in the shapes Llama uses; none of it needs a GPU. Returns each kernel's shared memory."""
    from workers import triton_attention as ta, triton_layer_ops as lo
    assert not ta.INTERPRETED

    shared = {}
    for dt, group, head_dim, block_size in (("bf16", 4, 128, 16), ("bf16", 8, 64, 32), ("fp32", 1, 64, 16)):
        tensors = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", Out=f"*{dt}", BlockTables="*i64", SeqLens="*i64",
                       MidO="*fp32", MidLse="*fp32", Chunks="*i64", Slots="*i64", qk_scale="fp32")
        block_d, rows = triton.next_power_of_2(head_dim), max(ta.PREFILL_ROWS, triton.next_power_of_2(group))
        key = f"{dt}-gqa{group}-d{head_dim}-bs{block_size}"
        shared[f"decode {key}"] = compile_for_hopper(ta._decode_split_kernel, tensors, dict(
            GROUP=group, HEAD_BLOCKS=triton.cdiv(group, ta.DECODE_BLOCK_H), HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_H=ta.DECODE_BLOCK_H, BLOCK_N=ta.DECODE_BLOCK_N, BLOCK_SIZE=block_size, NUM_SPLITS=8, WIDEN=False))
        shared[f"reduce {key}"] = compile_for_hopper(ta._decode_reduce_kernel, tensors, dict(
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=ta.DECODE_BLOCK_N, NUM_SPLITS=8, SPLITS_P2=8))
        shared[f"prefill {key}"] = compile_for_hopper(ta._prefill_kernel, tensors, dict(
            GROUP=group, TOKENS=rows // group, ROWS=rows, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_N=ta.PREFILL_BLOCK_N, WIDEN=False))
    tensors = {n: "*bf16" for n in ("X", "Delta", "W", "Out", "Sum", "Cos", "Sin", "GateUp")}
    tensors.update(Positions="*i64", eps="fp32")
    for add in (False, True):
        shared[f"rms_norm add={add}"] = compile_for_hopper(lo._rms_norm_kernel, tensors, dict(BLOCK=8192, ADD=add))
    shared["rotary"] = compile_for_hopper(lo._rotary_kernel, tensors, dict(HALF=64, BLOCK_H=32, BLOCK_HALF=64))
    shared["silu_mul"] = compile_for_hopper(lo._silu_mul_kernel, tensors, dict(BLOCK=lo.SILU_BLOCK))
    return shared


@pytest.mark.slow
def test_kernels_compile_for_a_gpu():
    """What the interpreter cannot see: that the compiler accepts the kernels and they fit a Hopper SM."""
    shared = run_with_the_compiler(check_compiles_for_hopper)
    assert len(shared) == 13
    assert max(shared.values()) <= 227 * 1024, shared          # an H100 / H200 block's shared memory
