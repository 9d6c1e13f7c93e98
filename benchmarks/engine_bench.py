"""`herd bench engine`: herd's Engine vs Hugging Face transformers' batched generate on one checkpoint.

The workload mixes prompt lengths 16–256 and output lengths 16–128 (48 requests by default). herd runs all
of them in one continuously batched `Engine.generate` call; transformers runs static batches of 16, left
padded, each batch generating until its longest requested output. Both count only the tokens each request
asked for, and each side runs in its own process so the peak RSS figures are its own.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import random
import resource
import time

from benchmarks.bench_common import log, scratch_dir, write_json

# ~58M parameters with a Llama 2 sized vocabulary: big enough that matmuls, not Python, dominate.
BENCH_SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                   num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)


def workload(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(16, 256))], rng.randint(16, 128)) for _ in range(n)]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_herd(path: str, dtype: str, n: int, max_num_seqs: int, out: mp.Queue) -> None:
    import torch

    from workers import Engine, SamplingParams
    from workers.cpu_kernels import cpu_kernel_module
    # Engine defaults otherwise (prefix caching on: the random prompts share no prefix, so it only costs hashing).
    engine = Engine.from_pretrained(path, dtype=dtype, show_progress=False, max_num_seqs=max_num_seqs)
    reqs = workload(n, engine.vocab_size)
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in reqs]
    # Warm-up on a prompt outside the workload, so the prefix cache holds nothing the timed run can reuse.
    engine.generate([[3] * 40], SamplingParams(max_tokens=2, ignore_eos=True))
    t0 = time.perf_counter()
    outs = engine.generate([p for p, _ in reqs], params)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    model = engine.executor.runner.model
    setup = {"threads": torch.get_num_threads(), "cpu_kernels": cpu_kernel_module() is not None,
             "packed_weights": model.layers[0].qkv.layout == torch._mkldnn}
    engine.shutdown()
    out.put({"tokens": tokens, "seconds": elapsed, "tok_per_s": tokens / elapsed, "peak_rss_mib": _peak_rss_mib(),
             "setup": setup})


def _run_transformers(path: str, dtype: str, n: int, batch_size: int, out: mp.Queue) -> None:
    import torch
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    reqs = workload(n, model.config.vocab_size)
    useful, t0 = 0, time.perf_counter()
    for i in range(0, n, batch_size):
        batch = reqs[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(m for _, m in batch)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        useful += sum(m for _, m in batch)
    elapsed = time.perf_counter() - t0
    out.put({"tokens": useful, "seconds": elapsed, "tok_per_s": useful / elapsed, "peak_rss_mib": _peak_rss_mib()})


def _in_process(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def run(args) -> int:
    from workers.demo import hf_config, write_checkpoint
    if args.model:
        path = args.model
    else:
        path = str(scratch_dir() / "llama-58m")          # removed when the bench exits
        write_checkpoint(path, hf_config(dtype=args.dtype, **BENCH_SHAPE))
    herd = _in_process(_run_herd, path, args.dtype, args.requests, args.max_num_seqs)
    log(json.dumps({"herd": herd}))
    result = {"model": path, "dtype": args.dtype, "requests": args.requests, "herd": herd}
    if not args.skip_transformers:
        hf = _in_process(_run_transformers, path, args.dtype, args.requests, args.hf_batch_size)
        result["transformers"] = hf
        result["speedup"] = herd["tok_per_s"] / hf["tok_per_s"]
    write_json(result, None)
    return 0


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("engine", help="herd Engine vs transformers batched generate (JSON)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: a generated ~58M-parameter model)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-num-seqs", type=int, default=48)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both engines (and of the generated checkpoint)")
    p.add_argument("--skip-transformers", action="store_true")
    p.set_defaults(func=run)
