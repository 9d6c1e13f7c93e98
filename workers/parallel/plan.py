"""Which TP × PP layouts fit a model on given GPUs, and how much KV cache each leaves (`herd plan`, whose
command line is cluster/plan_cli.py).

The arithmetic mirrors what the shards really allocate: weight bytes per shard follow the same Megatron
slices as `workers.model` (`ShardInfo`: q heads, kv heads — replicated when TP > kv heads —, MLP columns,
padded vocabulary rows, embedding on the first stage, lm_head and final norm on the last), KV bytes per
block are `shard.kv_block_bytes` (what the model runner allocates), and the KV budget follows `CacheBudget` on CUDA:
`memory × utilization − weights − runtime overhead`. The busiest shard decides, since every shard of a
group holds the same number of KV blocks.

Layouts considered: TP up to the GPUs of one node (a TP group all-reduces every layer, so it stays on a
node), any PP, and T·P dividing the cluster's GPUs so whole replicas tile it. The recommendation is the
layout that serves the most concurrent sequences of max_model_len over the whole cluster (replicas ×
sequences per replica), then the one with fewer pipeline stages (fewer bubbles), then more TP.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import ModelConfig, dtype_bytes
from ..errors import CheckpointError
from ..shard import ShardInfo, check_tensor_parallel, kv_block_bytes, partition_layers

if TYPE_CHECKING:              # dtypes are names or torch dtypes; the arithmetic itself needs no torch
    import torch

GiB = 1 << 30
RUNTIME_OVERHEAD = GiB + (512 << 20)   # CUDA context + NCCL buffers (~1 GiB) + CacheBudget's activation headroom

_LLAMA3_SCALING = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def _llama2(hidden, inter, layers, heads, kv):
    return dict(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float16")


def _llama3(hidden, inter, layers, heads, kv, factor, tied, head_dim=None):
    cfg = dict(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=131072,
               rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling={**_LLAMA3_SCALING, "factor": factor},
               tie_word_embeddings=tied, torch_dtype="bfloat16")
    if head_dim:
        cfg["head_dim"] = head_dim
    return cfg


# The published Hugging Face config.json values of each model (meta-llama/...).
SHAPES: dict[str, tuple[str, dict]] = {
    "llama2-7b": ("Llama 2 7B", _llama2(4096, 11008, 32, 32, 32)),
    "llama2-13b": ("Llama 2 13B", _llama2(5120, 13824, 40, 40, 40)),
    "llama2-70b": ("Llama 2 70B", _llama2(8192, 28672, 80, 64, 8)),
    "llama3-1b": ("Llama 3.2 1B", _llama3(2048, 8192, 16, 32, 8, 32.0, True, head_dim=64)),
    "llama3-3b": ("Llama 3.2 3B", _llama3(3072, 8192, 28, 24, 8, 32.0, True, head_dim=128)),
    "llama3-8b": ("Llama 3.1 8B", _llama3(4096, 14336, 32, 32, 8, 8.0, False)),
    "llama3-70b": ("Llama 3.1 70B", _llama3(8192, 28672, 80, 64, 8, 8.0, False)),
}
ALIASES = {"llama3.2-1b": "llama3-1b", "llama3.2-3b": "llama3-3b", "llama3.1-8b": "llama3-8b",
           "llama3.1-70b": "llama3-70b"}


def shape_config(name: str) -> tuple[str, ModelConfig]:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in SHAPES:
        raise CheckpointError(f"unknown shape {name!r} (known: {', '.join(list(SHAPES) + list(ALIASES))})")
    title, cfg = SHAPES[key]
    return title, ModelConfig.from_dict(cfg)


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'80GiB' / '80G' (binary) / '24GB' (decimal) / '81920MiB' / bytes -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise CheckpointError(f"size {text!r}: use a number with a unit such as 80GiB, 24GB or 40960MiB")
    value, unit, binary, b = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1000 if (unit and b and not binary) else 1024   # GB = 10^9; G, GiB = 2^30
    return int(float(value) * base ** power)


def shard_weight_bytes(cfg: ModelConfig, shard: ShardInfo, dtype: str | torch.dtype) -> int:
    """Bytes of the parameters `LlamaForCausalLM(cfg, shard=shard)` allocates (see workers/model.py)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q0, q1 = shard.q_heads(cfg)
    k0, k1 = shard.kv_heads(cfg)
    i0, i1 = shard.intermediate(cfg)
    n_q, n_kv, n_i = q1 - q0, k1 - k0, i1 - i0
    per_layer = (n_q + 2 * n_kv) * d * h + h * n_q * d + 2 * n_i * h + h * n_i + 2 * h
    params = len(shard.layers(cfg)) * per_layer
    rows = shard.vocab_per_rank(cfg)
    if shard.is_first_stage or (shard.is_last_stage and cfg.tie_word_embeddings):
        params += rows * h                      # embedding (also the tied lm_head)
    if shard.is_last_stage:
        params += h + (0 if cfg.tie_word_embeddings else rows * h)   # final norm (+ untied lm_head)
    return params * dtype_bytes(dtype)


@dataclass
class Layout:
    tp: int
    pp: int
    gpus: int                     # per replica
    replicas: int                 # whole replicas the cluster holds
    weight_bytes_per_gpu: int     # busiest shard
    kv_bytes_per_gpu: int         # KV budget of the busiest shard (every shard holds as many blocks)
    kv_tokens: int                # tokens of KV cache per replica
    max_seqs: int                 # concurrent sequences of max_model_len per replica
    fits: bool
    reason: str = ""
    # The same with kv_cache_dtype fp8 (e4m3, one byte an element; CUDA with the Triton attention).
    kv_tokens_fp8: int = 0
    max_seqs_fp8: int = 0

    @property
    def name(self) -> str:
        return f"TP{self.tp}" + (f"×PP{self.pp}" if self.pp > 1 else "")

    @property
    def total_seqs(self) -> int:
        return self.max_seqs * self.replicas


def evaluate(cfg: ModelConfig, tp: int, pp: int, *, gpu_memory: int, dtype: str | torch.dtype, max_model_len: int,
             total_gpus: int, gpu_memory_utilization: float = 0.9, block_size: int = 16,
             overhead: int = RUNTIME_OVERHEAD) -> Layout:
    check_tensor_parallel(cfg, tp)
    ranges = partition_layers(cfg.num_hidden_layers, pp)
    weights, blocks, blocks_fp8 = 0, None, None
    for p, (start, end) in enumerate(ranges):
        for t in range(tp):
            shard = ShardInfo(tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, layer_start=start, layer_end=end)
            w = shard_weight_bytes(cfg, shard, dtype)
            budget = int(gpu_memory * gpu_memory_utilization) - w - overhead
            block = kv_block_bytes(cfg, shard, block_size, dtype)
            n, n8 = max(0, budget) // block, max(0, budget) // (block // dtype_bytes(dtype))
            weights = max(weights, w)
            blocks = n if blocks is None else min(blocks, n)
            blocks_fp8 = n8 if blocks_fp8 is None else min(blocks_fp8, n8)
    kv_bytes = max(0, int(gpu_memory * gpu_memory_utilization) - weights - overhead)
    per_seq = -(-max_model_len // block_size)
    max_seqs = blocks // per_seq
    reason = ""
    if kv_bytes <= 0:
        reason = f"weights ({weights / GiB:.1f} GiB per GPU) leave no room for the KV cache"
    elif max_seqs < 1:
        reason = f"KV cache holds {blocks * block_size} tokens, less than one sequence of {max_model_len}"
    return Layout(tp, pp, tp * pp, total_gpus // (tp * pp), weights, kv_bytes, blocks * block_size, max_seqs,
                  fits=max_seqs >= 1, reason=reason, kv_tokens_fp8=blocks_fp8 * block_size,
                  max_seqs_fp8=blocks_fp8 // per_seq)


def candidate_layouts(cfg: ModelConfig, gpus_per_node: int, total_gpus: int) -> list[tuple[int, int]]:
    out = []
    for tp in range(1, gpus_per_node + 1):
        try:
            check_tensor_parallel(cfg, tp)
        except CheckpointError:
            continue
        for pp in range(1, min(cfg.num_hidden_layers, total_gpus // tp) + 1):
            if total_gpus % (tp * pp) == 0:
                out.append((tp, pp))
    return out


def plan(cfg: ModelConfig, *, gpus_per_node: int, gpu_memory: int, nodes: int = 1, max_model_len: int | None = None,
         dtype: str | torch.dtype = "bfloat16", gpu_memory_utilization: float = 0.9, block_size: int = 16) -> list[Layout]:
    """Every candidate layout, fitting ones first (best first), then the ones that do not fit."""
    if gpus_per_node < 1 or nodes < 1:
        raise CheckpointError("--gpus-per-node and --nodes must be >= 1")
    total = gpus_per_node * nodes
    max_model_len = max_model_len or cfg.max_position_embeddings
    layouts = [evaluate(cfg, tp, pp, gpu_memory=gpu_memory, dtype=dtype, max_model_len=max_model_len,
                        total_gpus=total, gpu_memory_utilization=gpu_memory_utilization, block_size=block_size)
               for tp, pp in candidate_layouts(cfg, gpus_per_node, total)]
    return sorted(layouts, key=lambda l: (not l.fits, -l.total_seqs, l.pp, -l.tp))


def min_gpus_needed(cfg: ModelConfig, *, gpus_per_node: int, gpu_memory: int, max_model_len: int,
                    dtype: str | torch.dtype, gpu_memory_utilization: float = 0.9, limit: int = 1024) -> Layout | None:
    """The smallest layout (fewest GPUs of this size, TP within a node) that fits, if any does."""
    best = None
    for tp in range(1, gpus_per_node + 1):
        try:
            check_tensor_parallel(cfg, tp)
        except CheckpointError:
            continue
        for pp in range(1, min(cfg.num_hidden_layers, limit // tp) + 1):
            layout = evaluate(cfg, tp, pp, gpu_memory=gpu_memory, dtype=dtype, max_model_len=max_model_len,
                              total_gpus=tp * pp, gpu_memory_utilization=gpu_memory_utilization)
            if layout.fits:
                if best is None or (layout.gpus, layout.pp) < (best.gpus, best.pp):
                    best = layout
                break
    return best
