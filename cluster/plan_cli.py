"""`herd plan`: the command line over workers/parallel/plan.py (which layouts fit, with memory per GPU).

It reads only a config.json (or a published shape) and does arithmetic: no torch, no Ray.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from workers.config import ModelConfig, dtype_name
from workers.parallel.plan import (RUNTIME_OVERHEAD, SHAPES, GiB, min_gpus_needed, parse_size, plan, shape_config,
                                   shard_weight_bytes)
from workers.shard import ShardInfo


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def cmd_plan(args) -> int:
    if bool(args.model) == bool(args.shape):
        print("herd plan: give exactly one of --model DIR or --shape NAME "
              f"(shapes: {', '.join(SHAPES)})", file=sys.stderr)
        return 2
    if args.model:
        cfg = ModelConfig.from_pretrained(args.model)
        title = args.model
    else:
        title, cfg = shape_config(args.shape)
    # The engine's default on GPUs is the checkpoint's stored dtype (resolve_dtype); shapes are bf16.
    dtype = dtype_name(args.dtype, cfg.stored_dtype_name if args.model else "bfloat16")
    gpu_memory = parse_size(args.gpu_memory)
    max_len = args.max_model_len or cfg.max_position_embeddings
    layouts = plan(cfg, gpus_per_node=args.gpus_per_node, gpu_memory=gpu_memory, nodes=args.nodes,
                   max_model_len=max_len, dtype=dtype, gpu_memory_utilization=args.gpu_memory_utilization,
                   block_size=args.block_size)
    fitting = [l for l in layouts if l.fits]
    total_weights = shard_weight_bytes(cfg, ShardInfo(), dtype)
    header = (f"{title}: {cfg.num_params / 1e9:.2f}B parameters, {_gib(total_weights)} of weights in "
              f"{dtype}; max_model_len {max_len}\n"
              f"cluster: {args.nodes} node(s) × {args.gpus_per_node} GPU(s) × {_gib(gpu_memory)} "
              f"({args.gpu_memory_utilization:.0%} usable, {_gib(RUNTIME_OVERHEAD)} runtime overhead per GPU)")
    if args.json:
        print(json.dumps({"model": title, "dtype": dtype, "max_model_len": max_len,
                          "weight_bytes": total_weights, "gpus": args.nodes * args.gpus_per_node,
                          "gpu_memory_bytes": gpu_memory,
                          "layouts": [{"name": l.name, **asdict(l)} for l in layouts],
                          "recommended": fitting[0].name if fitting else None}, indent=2))
        return 0 if fitting else 1
    if not fitting:
        need = min_gpus_needed(cfg, gpus_per_node=args.gpus_per_node, gpu_memory=gpu_memory, max_model_len=max_len,
                               dtype=dtype, gpu_memory_utilization=args.gpu_memory_utilization)
        best = max(layouts, key=lambda l: (l.kv_bytes_per_gpu, -l.weight_bytes_per_gpu)) if layouts else None
        msg = [header, f"does not fit: no TP × PP layout of {args.nodes * args.gpus_per_node} GPU(s) of "
                       f"{_gib(gpu_memory)} holds the weights plus one sequence of {max_len} tokens."]
        if best is not None:
            msg.append(f"  closest: {best.name} needs {_gib(best.weight_bytes_per_gpu)} of weights per GPU; {best.reason}")
        if need is not None:
            msg.append(f"  smallest layout that fits GPUs of this size: {need.name} ({need.gpus} GPUs, "
                       f"{_gib(need.weight_bytes_per_gpu)} weights + {_gib(need.kv_bytes_per_gpu)} KV cache per GPU)")
        else:
            msg.append("  no layout of GPUs this size fits (lower --max-model-len, or use larger GPUs)")
        print("\n".join(msg), file=sys.stderr)
        return 1
    print(header)
    print(f"{'layout':<10} {'GPUs':>4} {'replicas':>8} {'weights/GPU':>12} {'KV cache/GPU':>13} "
          f"{'KV tokens':>10} {'seqs/replica':>12} {'seqs total':>10} {'fp8 KV tokens':>13} {'fp8 seqs':>8}")
    for l in fitting:
        print(f"{l.name:<10} {l.gpus:>4} {l.replicas:>8} {_gib(l.weight_bytes_per_gpu):>12} "
              f"{_gib(l.kv_bytes_per_gpu):>13} {l.kv_tokens:>10} {l.max_seqs:>12} {l.total_seqs:>10} "
              f"{l.kv_tokens_fp8:>13} {l.max_seqs_fp8:>8}")
    rejected = [l for l in layouts if not l.fits]
    if rejected:
        print("does not fit: " + ", ".join(f"{l.name} ({l.reason})" for l in rejected))
    best = fitting[0]
    print(f"recommended: {best.name} × {best.replicas} replica(s): {best.total_seqs} concurrent sequences of "
          f"{max_len} tokens (herd serve: tensor_parallel_size: {best.tp}, pipeline_parallel_size: {best.pp}); "
          f"with an fp8 KV cache (kv_cache_dtype: fp8, CUDA): {best.max_seqs_fp8 * best.replicas}")
    return 0


def register_plan_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="TP × PP layouts that fit a model on given GPUs, with memory per GPU")
    src = p.add_argument_group("model (one of)")
    src.add_argument("--model", help="checkpoint folder (only config.json is read)")
    src.add_argument("--shape", help=f"a published Llama shape: {', '.join(SHAPES)}")
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu-memory", required=True, help="memory of one GPU, e.g. 80GiB, 24GB")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--dtype", default=None, help="weights and KV cache dtype (default: bf16; --model: as stored)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)
    return p
