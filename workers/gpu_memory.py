"""How many KV blocks a replica on a GPU gets: from `gpu_memory_utilization`, after a profiling forward.

`gpu_memory_utilization` is this replica's share of the device (vLLM's meaning): two replicas sharing a GPU
at 0.45 each both fit. Within its share a replica needs its weights, the activations of its largest step
and its CUDA graphs' memory pool; the rest is KV cache. And whatever the share says, the cache must fit in
what is free on the device now, next to what other processes (other replicas, other programs) already hold:

    kv = min(total x utilization - peak - graphs - margin,       what this replica may take
             free - (peak - allocated) - graphs - margin)          what the device still has

- `peak`: torch.cuda.max_memory_allocated() over a profiling forward at the largest step (a prefill of the
  step's token budget, and a decode of the largest graph batch, whose logits are the widest tensor), the
  profiling cache's own bytes left out: weights plus the largest step's activations.
- `allocated`: what this process holds after the profile (the weights); `peak - allocated` is what a step
  will take again from the free memory.
- `graphs`: the decode graphs' pool holds about one largest-decode step's activations for good (the graphs
  are captured after the cache is allocated, so this is reserved from the profile, not measured).
- `margin`: the CUDA context, cuBLAS workspaces and allocator fragmentation that torch does not count.

The arithmetic is `kv_cache_bytes` (plain numbers, tested on the CPU); `profiled_kv_blocks` takes the numbers
from the device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .errors import CheckpointError

if TYPE_CHECKING:
    from .model import LlamaForCausalLM
    from .model_runner import ModelRunner

log = logging.getLogger(f"herd.{__name__}")

MiB = 1 << 20
NON_TORCH_MARGIN = 512 * MiB        # CUDA context + cuBLAS workspaces + fragmentation, not in torch's counters
PROFILE_TOKENS = 2048               # the prefill token budget of a step (EngineConfig.max_num_batched_tokens)
PROFILE_DECODE_BATCH = 256          # the largest decode graph (cuda_graphs.DEFAULT_MAX_GRAPH_BATCH)


KV_CACHE_DTYPES = ("auto", "fp8")
FP8_KV_DTYPE = torch.float8_e4m3fn      # what "fp8" stores: 4 exponent bits, 3 mantissa bits, no infinities


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, model: "LlamaForCausalLM") -> torch.dtype:
    """The cache's element type: the model's ("auto"), or e4m3 ("fp8": half the bytes of bf16, so twice the
    tokens per replica), which only the Triton attention reads (it dequantizes where it loads K and V)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise CheckpointError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    if kv_cache_dtype == "auto":
        return model_dtype
    # By name: importing triton_attention imports triton, which a CPU-only install may lack.
    if not all(type(layer.attention).__name__ == "TritonPagedAttention" for layer in model.layers):
        raise CheckpointError("kv_cache_dtype fp8 needs the Triton attention (CUDA with triton, "
                              "HERD_TRITON_ATTENTION not 0)")
    return FP8_KV_DTYPE


@dataclass(frozen=True)
class MemoryReading:
    total: int          # device bytes (mem_get_info)
    free: int           # free on the device now: other processes' memory and this one's already taken out
    allocated: int      # this process's torch allocations now (weights)
    peak: int           # this process's torch peak over the profiling forward (weights + activations)
    graphs: int         # reserved for the CUDA graphs' memory pool (0 without graphs)


def kv_cache_bytes(m: MemoryReading, utilization: float, margin: int = NON_TORCH_MARGIN) -> int:
    """Bytes the KV cache may take (see the module docstring); negative when nothing is left."""
    share = int(m.total * utilization) - m.peak - m.graphs - margin
    on_device = m.free - (m.peak - m.allocated) - m.graphs - margin
    return min(share, on_device)


def kv_blocks(m: MemoryReading, utilization: float, block_bytes: int, margin: int = NON_TORCH_MARGIN) -> int:
    """Whole KV blocks in the budget; a CheckpointError saying which limit binds when not even one fits."""
    budget = kv_cache_bytes(m, utilization, margin)
    if budget >= block_bytes:
        return budget // block_bytes
    share = int(m.total * utilization)
    others = m.total - m.free - m.allocated
    raise CheckpointError(
        f"no GPU memory left for the KV cache: this replica's share is {share / 2**30:.1f} GiB "
        f"(gpu_memory_utilization {utilization}), its weights and largest step take {m.peak / 2**30:.1f} GiB, "
        f"CUDA graphs {m.graphs / 2**30:.1f} GiB; {m.free / 2**30:.1f} GiB is free on the device, other "
        f"processes hold about {max(0, others) / 2**30:.1f} GiB; one block needs {block_bytes} bytes. Raise "
        "gpu_memory_utilization, lower max_num_seqs / max_model_len, or use more shards")


def profile_steps(runner: "ModelRunner", tokens: int, decode_batch: int) -> tuple[list, int]:
    """The profiling steps (a `tokens`-token prefill sampling its last row, a `decode_batch`-row decode)
    and the KV blocks they use, laid out in a small cache of their own."""
    from .model_runner import StepInput

    bs = runner.block_size
    tokens = max(1, min(tokens, runner.max_model_len))
    table = list(range(-(-tokens // bs)))
    prefill = StepInput(input_ids=[0] * tokens, positions=list(range(tokens)),
                        slot_mapping=[table[p // bs] * bs + p % bs for p in range(tokens)],
                        prefills=[(0, tokens, tokens, table)], sample_indices=[tokens - 1])
    first = len(table)
    decode = StepInput(input_ids=[0] * decode_batch, positions=[0] * decode_batch,
                       slot_mapping=[(first + i) * bs for i in range(decode_batch)], num_decode=decode_batch,
                       decode_block_tables=[[first + i] for i in range(decode_batch)],
                       decode_seq_lens=[1] * decode_batch, sample_indices=list(range(decode_batch)))
    return [prefill, decode], first + decode_batch


def measure(runner: "ModelRunner", graphs: bool, tokens: int = PROFILE_TOKENS,
            decode_batch: int = PROFILE_DECODE_BATCH) -> MemoryReading:
    """Run the profiling steps on the runner's CUDA device over a temporary cache of their own, and read the
    device's and torch's counters. Each step's activations are its peak above the weights and that cache."""
    device = runner.device
    steps, blocks = profile_steps(runner, tokens, decode_batch)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated(device)
    k0, k1 = runner.shard.kv_heads(runner.cfg)
    shape = (blocks, runner.block_size, k1 - k0, runner.cfg.head_dim)
    runner.kv_caches = [(torch.zeros(shape, dtype=runner.kv_dtype, device=device),
                         torch.zeros(shape, dtype=runner.kv_dtype, device=device)) for _ in runner.model.layers]
    base = torch.cuda.memory_allocated(device)
    activations = []
    try:
        for step in steps:
            torch.cuda.reset_peak_memory_stats(device)
            runner.execute(step)
            activations.append(torch.cuda.max_memory_allocated(device) - base)
    finally:
        runner.kv_caches = []
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    return MemoryReading(total=total, free=free, allocated=allocated, peak=weights + max(activations),
                         graphs=activations[1] if graphs else 0)


def profiled_kv_blocks(runner: "ModelRunner", utilization: float, block_bytes: int) -> int:
    """KV blocks for a runner on CUDA whose weights are loaded and whose cache is not allocated yet."""
    from .cuda_graphs import graphs_wanted

    reading = measure(runner, graphs=graphs_wanted(runner))
    blocks = kv_blocks(reading, utilization, block_bytes)
    log.info("GPU memory: %.1f GiB total, %.1f GiB free; weights %.2f GiB, largest step %.2f GiB, graphs %.2f GiB "
             "-> %d KV blocks (%.2f GiB)", reading.total / 2**30, reading.free / 2**30, reading.allocated / 2**30,
             (reading.peak - reading.allocated) / 2**30, reading.graphs / 2**30, blocks,
             blocks * block_bytes / 2**30)
    return blocks
