"""`herd bench engine`: herd's Engine vs Hugging Face transformers' batched generate on one checkpoint.

The workload mixes prompt lengths 16–256 and output lengths 16–128 (48 requests by default). herd runs all
of them in one continuously batched `Engine.generate` call; transformers runs static batches of 16, left
padded, each batch generating until its longest requested output. Both count only the tokens each request
asked for, and each side runs in its own process so the peak RSS figures are its own.

`herd bench engine --structured` measures instead what grammar-constrained decoding costs: the time of a
decode step with 32 sequences (--batch) all decoding, unconstrained and then each following a JSON
schema, and the time the token masks themselves take in those steps (computing and applying them). The model
is the same shape with Meta's Llama 3 tokenizer and its 128,256-token vocabulary (a grammar needs a real
tokenizer, and the largest vocabulary is the costliest mask).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import resource
import time

from benchmarks.bench_args import positive_int
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


# An array of records that must hold at least 60 items: every sequence stays inside the grammar for the whole
# measured run, through keys, strings, enums, integers and separators.
STRUCTURED_SCHEMA = {"type": "array", "minItems": 60, "items": {
    "type": "object", "additionalProperties": False, "required": ["id", "name", "kind"],
    "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
                   "kind": {"enum": ["user", "admin", "guest"]}}}}


def _run_structured(path: str, dtype: str, batch: int, steps: int, rounds: int, out: mp.Queue) -> None:
    import torch

    import workers.sampling as sampling
    from workers import Engine, SamplingParams

    mask_seconds = [0.0]
    real_masks = sampling.apply_logit_masks

    def timed_masks(logits, states):  # the mask's own share of a step: compute (llguidance) + apply
        t = time.perf_counter()
        try:
            return real_masks(logits, states)
        finally:
            mask_seconds[0] += time.perf_counter() - t
    sampling.apply_logit_masks = timed_masks

    engine = Engine.from_pretrained(path, dtype=dtype, show_progress=False, max_num_seqs=batch,
                                    max_num_batched_tokens=max(2048, batch * 40))
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100000) for _ in range(32)] for _ in range(batch)]

    def decode_steps(structured: bool) -> tuple[list[float], list[float]]:
        spec = {"json_schema": STRUCTURED_SCHEMA} if structured else None
        params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, structured=spec)
        for p in prompts:
            engine.add_request(p, params)
        step_times, mask_times = [], []
        while engine.has_unfinished():
            full = len(engine.scheduler.running) == batch and all(
                s.num_computed == s.num_tokens - 1 for s in engine.scheduler.running)
            mask_seconds[0] = 0.0
            t = time.perf_counter()
            deltas = engine.step()
            dt = time.perf_counter() - t
            if full and len(deltas) == batch and not any(d.finished for d in deltas):
                step_times.append(dt)
                mask_times.append(mask_seconds[0])
        return step_times, mask_times

    decode_steps(True)  # warm-up: the tokenizer's grammar view, the schema's compilation, first steps
    plain, constrained, masks = [], [], []
    for _ in range(rounds):  # alternating, so a change in the machine's load hits both sides alike
        plain += decode_steps(False)[0]
        step_times, mask_times = decode_steps(True)
        constrained += step_times
        masks += mask_times
    engine.shutdown()

    def median(xs):
        return sorted(xs)[len(xs) // 2]
    plain_ms, constrained_ms, mask_ms = median(plain) * 1e3, median(constrained) * 1e3, median(masks) * 1e3
    out.put({"batch": batch, "vocab_size": engine.vocab_size, "decode_steps_measured": [len(plain), len(constrained)],
             "plain_step_ms": plain_ms, "structured_step_ms": constrained_ms, "mask_ms_per_step": mask_ms,
             "mask_share_of_step": mask_ms / constrained_ms,
             "step_overhead": (constrained_ms - plain_ms) / plain_ms, "threads": torch.get_num_threads(),
             # other work on the machine inflates both step times (and the masks' threads compete for cores)
             "load_average_1m": os.getloadavg()[0], "cpus": os.cpu_count()})


def run_structured(args) -> int:
    from workers.demo import LLAMA3_VOCAB, hf_config, write_checkpoint
    if args.model:
        path = args.model
    else:
        path = str(scratch_dir() / "llama-58m-llama3-vocab")  # removed when the bench exits
        shape = dict(BENCH_SHAPE, vocab_size=LLAMA3_VOCAB, bos_token_id=128000, eos_token_id=[128001, 128009])
        write_checkpoint(path, hf_config(dtype=args.dtype, **shape), tokenizer="llama3")
    result = _in_process(_run_structured, path, args.dtype, args.batch, args.steps, args.rounds)
    write_json({"model": path, "dtype": args.dtype, "schema": STRUCTURED_SCHEMA, "structured": result}, None)
    return 0


def run(args) -> int:
    from workers.demo import hf_config, write_checkpoint
    if getattr(args, "structured", False):
        return run_structured(args)
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
    p.add_argument("--requests", type=positive_int, default=48)
    p.add_argument("--max-num-seqs", type=positive_int, default=48)
    p.add_argument("--hf-batch-size", type=positive_int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both engines (and of the generated checkpoint)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--structured", action="store_true",
                   help="instead: grammar mask overhead per decode step (JSON schema, Llama 3 vocabulary)")
    p.add_argument("--batch", type=positive_int, default=32, help="--structured: sequences decoding together")
    p.add_argument("--steps", type=positive_int, default=24, help="--structured: decode steps per run")
    p.add_argument("--rounds", type=positive_int, default=3, help="--structured: unconstrained/constrained run pairs")
    p.set_defaults(func=run)
