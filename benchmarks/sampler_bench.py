"""`herd bench sampler`: what the request-dependent stages of the sampler cost a decode step, without a model.

A batch of --batch rows of --vocab logits (Llama 3's 128,256 by default), each row with a repetition and a
frequency penalty and a --logit-bias-tokens entry logit_bias, is sampled --steps times for each output
length in --output-tokens (the rows' prompts --prompt-tokens long, random tokens: the worst case, every token
distinct). The figure is the time of one step of the penalties and of the bias: what every sequence of a batch
waits for, whoever asked for them. Only the tokens a row has seen are touched (workers/seen_tokens.py), so the
cost follows the rows' distinct tokens, not the vocabulary.
"""
from __future__ import annotations

import random
import time

from benchmarks.bench_args import concurrency_levels, non_negative_int, positive_int
from benchmarks.bench_common import log, write_json


def measure(batch: int, vocab: int, prompt_tokens: int, output_tokens: int, bias_tokens: int, steps: int) -> dict:
    import torch

    from workers.sampling import SamplingParams, SamplingState, apply_logit_masks, apply_penalties

    rng = random.Random(0)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.1, frequency_penalty=0.5, presence_penalty=0.1,
                            logit_bias={rng.randrange(vocab): -1.0 for _ in range(bias_tokens)})
    states = [SamplingState.create(params, [rng.randrange(vocab) for _ in range(prompt_tokens)])
              for _ in range(batch)]
    for st in states:
        st.output_token_ids += [rng.randrange(vocab) for _ in range(output_tokens)]
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    timings = {"penalties": [], "logit_bias": []}
    for _ in range(steps + 1):   # the first step builds each sequence's state: not counted
        work = logits.clone()
        start = time.perf_counter()
        apply_penalties(work, states)
        middle = time.perf_counter()
        apply_logit_masks(work, states)
        end = time.perf_counter()
        timings["penalties"].append(middle - start)
        timings["logit_bias"].append(end - middle)
        for st in states:   # one new token each, as a decode step adds
            st.output_token_ids.append(rng.randrange(vocab))
    return {"output_tokens": output_tokens,
            **{f"{stage}_ms_per_step": round(1000 * sorted(t[1:])[len(t[1:]) // 2], 3)
               for stage, t in timings.items()}}


def run(args) -> int:
    levels = []
    for n in args.output_tokens:
        log(f"sampler: {args.batch} rows x {args.vocab} logits, {n} output tokens each ...")
        levels.append(measure(args.batch, args.vocab, args.prompt_tokens, n, args.logit_bias_tokens, args.steps))
    write_json({"bench": "sampler", "batch": args.batch, "vocab": args.vocab, "prompt_tokens": args.prompt_tokens,
                "logit_bias_tokens": args.logit_bias_tokens, "steps": args.steps, "levels": levels}, args.out)
    return 0


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("sampler", help="per-step cost of penalties and logit_bias, no model (JSON)")
    p.add_argument("--batch", type=positive_int, default=32, help="rows sampled together")
    p.add_argument("--vocab", type=positive_int, default=128256, help="logits per row")
    p.add_argument("--prompt-tokens", type=non_negative_int, default=200)
    p.add_argument("--output-tokens", type=concurrency_levels, default=[100, 8000, 32000],
                   help="comma-separated output lengths, one measurement each")
    p.add_argument("--logit-bias-tokens", type=non_negative_int, default=1024)
    p.add_argument("--steps", type=positive_int, default=5, help="steps measured per level (median)")
    p.add_argument("--out", default=None, help="JSON report file (default: stdout)")
    p.set_defaults(func=run)
