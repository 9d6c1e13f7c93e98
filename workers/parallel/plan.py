"""`herd plan`: which TP × PP layouts fit a model on given GPUs, and what each leaves for the KV cache.

Per GPU: weights ≈ (layers/PP) × (per-layer weights / TP) plus the embedding / lm_head slice (vocab / TP) on
the first / last stage; KV cache per token = 2 × (layers/PP) × max(1, kv_heads/TP) × head_dim × bytes
(kv heads are replicated when TP exceeds them). What is left of `gpu_memory × utilization` after weights and
an activation reserve holds the KV cache; a layout fits when one sequence of max_model_len fits in it.
TP stays inside a node (NVLink); PP spans nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..config import ModelConfig, parse_dtype
from ..demo import hf_config
from ..errors import CheckpointError
from ..shard import check_tensor_parallel

# Published Hugging Face configs of the real models (the parts that size memory).
REAL_SHAPES: dict[str, dict] = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
    "llama2-70b": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        tie_word_embeddings=True, head_dim=64),
    "llama3.2-3b": dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=131072,
                        tie_word_embeddings=True, head_dim=128),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072),
}
ACTIVATION_RESERVE = 2 << 30   # per GPU: activations, CUDA context, allocator slack


@dataclass
class Layout:
    tp: int
    pp: int
    weight_bytes: int        # per GPU (the largest stage)
    kv_bytes: int            # per GPU, available for the KV cache
    kv_bytes_per_token: int  # per GPU
    max_seqs: int            # concurrent sequences of max_model_len

    @property
    def fits(self) -> bool:
        return self.max_seqs >= 1


def model_shape(name_or_path: str) -> ModelConfig:
    if name_or_path in REAL_SHAPES:
        spec = dict(REAL_SHAPES[name_or_path])
        return ModelConfig.from_dict(hf_config(**spec))
    if Path(name_or_path).is_dir():
        return ModelConfig.from_pretrained(name_or_path)
    raise CheckpointError(f"{name_or_path!r} is neither a checkpoint folder nor a known shape "
                          f"({', '.join(REAL_SHAPES)})")


def per_gpu(cfg: ModelConfig, tp: int, pp: int, elem: int) -> tuple[int, int]:
    """(weight bytes of the heaviest shard, KV bytes per token per shard)."""
    h, d = cfg.hidden_size, cfg.head_dim
    kv_local = max(1, cfg.num_key_value_heads // tp)
    per_layer = (h * (cfg.num_attention_heads // tp) * d * 2 + 2 * h * kv_local * d
                 + 3 * h * (cfg.intermediate_size // tp) + 2 * h)
    layers = math.ceil(cfg.num_hidden_layers / pp)
    vocab_rows = math.ceil(cfg.vocab_size / tp) * h
    ends = vocab_rows * (1 if pp > 1 or cfg.tie_word_embeddings else 2)  # first or last stage's share
    weights = (layers * per_layer + ends) * elem
    kv_per_token = 2 * layers * kv_local * d * elem
    return weights, kv_per_token


def plan(cfg: ModelConfig, *, gpus_per_node: int, gpu_memory: int, nodes: int = 1, max_model_len: int | None = None,
         dtype: str = "bfloat16", utilization: float = 0.9) -> list[Layout]:
    elem = parse_dtype(dtype).itemsize
    max_len = max_model_len or cfg.max_position_embeddings
    layouts = []
    for tp in (1, 2, 4, 8, 16):
        if tp > gpus_per_node:
            break
        try:
            check_tensor_parallel(cfg, tp)
        except CheckpointError:
            continue
        for pp in range(1, nodes * gpus_per_node // tp + 1):
            if pp > cfg.num_hidden_layers:
                break
            weights, kv_tok = per_gpu(cfg, tp, pp, elem)
            kv = int(gpu_memory * utilization) - weights - ACTIVATION_RESERVE
            layouts.append(Layout(tp, pp, weights, max(kv, 0), kv_tok, max(kv, 0) // (kv_tok * max_len)))
    return layouts


def _gib(n: int) -> str:
    return f"{n / 2**30:6.1f}"


def parse_size(text: str) -> int:
    t = text.strip().lower().replace(" ", "")
    for suffix, mult in (("gib", 2**30), ("gb", 10**9), ("mib", 2**20), ("g", 2**30)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def cmd_plan(args) -> int:
    cfg = model_shape(args.model or args.shape)
    layouts = plan(cfg, gpus_per_node=args.gpus_per_node, gpu_memory=parse_size(args.gpu_memory), nodes=args.nodes,
                   max_model_len=args.max_model_len, dtype=args.dtype)
    max_len = args.max_model_len or cfg.max_position_embeddings
    fitting = [l for l in layouts if l.fits]
    print(f"model: {args.model or args.shape} ({cfg.num_params / 1e9:.1f}B parameters, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv heads), {args.dtype}, max_model_len {max_len}")
    print(f"cluster: {args.nodes} node(s) × {args.gpus_per_node} GPU(s) × {args.gpu_memory}")
    if not fitting:
        print("no layout fits: the weights and one sequence of max_model_len need more GPU memory than this cluster has"
              " (add GPUs or nodes, lower max_model_len, or use a smaller model)")
        return 1
    print(f"{'layout':<10} {'GPUs':>4} {'weights/GPU GiB':>16} {'KV cache/GPU GiB':>17} {'max seqs @ max_model_len':>25}")
    for l in fitting:
        print(f"{f'TP{l.tp}×PP{l.pp}':<10} {l.tp * l.pp:>4} {_gib(l.weight_bytes):>16} {_gib(l.kv_bytes):>17} {l.max_seqs:>25}")
    best = recommend(fitting)
    others = [f"TP{l.tp}×PP{l.pp}" for l in fitting if l.tp * l.pp == best.tp * best.pp and l is not best]
    print(f"recommended: TP{best.tp}×PP{best.pp}" + (f" (alternatives on as many GPUs: {', '.join(others)})" if others else ""))
    return 0


def recommend(fitting: list[Layout]) -> Layout:
    """Use every GPU the layouts allow, with as much TP (inside a node) as possible: TP cuts per-token latency,
    PP only adds capacity."""
    return max(fitting, key=lambda l: (l.tp * l.pp, l.tp))


def register_plan_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="TP/PP layouts that fit a model on given GPUs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint folder")
    src.add_argument("--shape", choices=list(REAL_SHAPES), help="a real model's published shape")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory", required=True, help="per GPU, e.g. 80GiB")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=cmd_plan)
