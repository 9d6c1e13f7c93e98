"""Which grammar engine: llguidance vs xgrammar, token-mask cost on Meta's Llama 3 vocabulary (128,256 tokens).

The measurement behind the choice in workers/structured_output.py (figures: docs/structured-outputs.md).
For each backend and grammar it walks 5 seeded random paths through the grammar (a random allowed token at
each step, as a model that knows nothing would), timing the mask of every step on one thread: the first
mask (lexer/parser warm-up) and the median / mean / p90 of the rest; plus the compilation of the grammar.

xgrammar is not a herd dependency (it pulls transformers, triton and tvm-ffi); to include it, install it
beside the venv without touching torch and point XGRAMMAR_PATH at it:

    .venv/bin/pip install --no-deps --target /tmp/xgr xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
    XGRAMMAR_PATH=/tmp/xgr OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.grammar_backends
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time

import numpy as np

from workers.demo_tokenizer import llama3_tokenizer_path
from workers.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "tags", "address", "score"],
          "properties": {
              "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,12}$"},
              "age": {"type": "integer", "minimum": 0, "maximum": 150},
              "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
              "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                          "properties": {"city": {"type": "string", "maxLength": 20},
                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
              "score": {"type": "number", "minimum": 0, "maximum": 1}}}
REGEX = r"[a-z]{3,10}@[a-z]{3,8}\.(com|org|net)"
GRAMMARS = {"json_schema": SCHEMA, "regex": REGEX}
PATHS, MAX_STEPS = 5, 60


def walk(fill, consume, done, vocab: int, stops: set[int], seed: int) -> list[float]:
    rng, times = random.Random(seed), []
    mask = np.zeros((vocab + 31) // 32, dtype=np.int32)
    while len(times) < MAX_STEPS and not done():
        t = time.perf_counter()
        fill(mask)
        times.append(time.perf_counter() - t)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])
        choices = [int(i) for i in allowed if int(i) not in stops] or [int(i) for i in allowed]
        consume(rng.choice(choices))
    return times


def summary(compile_s: float, firsts: list[float], rest: list[float]) -> dict:
    rest = sorted(rest)
    return {"compile_ms": round(compile_s * 1e3, 2), "first_mask_ms": round(statistics.median(firsts) * 1e3, 3),
            "mask_us_median": round(rest[len(rest) // 2] * 1e6, 1), "mask_us_mean": round(statistics.mean(rest) * 1e6, 1),
            "mask_us_p90": round(rest[int(len(rest) * 0.9)] * 1e6, 1), "tokens": len(rest) + len(firsts)}


def llguidance_figures(tok: Tokenizer, stops: list[int]) -> dict:
    import llguidance

    from workers.structured_output import JSON_OPTIONS, ll_tokenizer
    t = time.perf_counter()
    lt = ll_tokenizer(tok, tok.vocab_size, stops)
    out = {"tokenizer_s": round(time.perf_counter() - t, 2)}
    for name, g in GRAMMARS.items():
        text = llguidance.LLMatcher.grammar_from_json_schema(g, overrides=JSON_OPTIONS) if name == "json_schema" \
            else llguidance.LLMatcher.grammar_from_regex(g)
        compiles, firsts, rest = [], [], []
        for seed in range(PATHS):
            t = time.perf_counter()
            m = llguidance.LLMatcher(lt, text, log_level=0)
            compiles.append(time.perf_counter() - t)
            times = walk(lambda mask: m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes), m.consume_token,
                         m.is_stopped, tok.vocab_size, set(stops), seed)
            firsts.append(times[0])
            rest += times[1:]
        out[name] = summary(statistics.median(compiles), firsts, rest)
    return out


def xgrammar_figures(tok: Tokenizer, stops: list[int]) -> dict:
    import xgrammar as xgr
    t = time.perf_counter()
    info = xgr.TokenizerInfo([tok.token_bytes(i) for i in range(tok.vocab_size)], xgr.VocabType.RAW,
                             vocab_size=tok.vocab_size, stop_token_ids=stops)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    out = {"tokenizer_s": round(time.perf_counter() - t, 2)}
    for name, g in GRAMMARS.items():
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(g), any_whitespace=False, separators=(", ", ": ")) \
            if name == "json_schema" else compiler.compile_regex(g)
        compile_s = time.perf_counter() - t
        firsts, rest = [], []
        for seed in range(PATHS):
            m = xgr.GrammarMatcher(compiled)
            bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)

            def fill(mask, m=m, bitmask=bitmask):
                m.fill_next_token_bitmask(bitmask)
                mask[:] = bitmask[0].numpy()
            times = walk(fill, m.accept_token, m.is_terminated, tok.vocab_size, set(stops), seed)
            firsts.append(times[0])
            rest += times[1:]
        out[name] = summary(compile_s, firsts, rest)
    return out


def main() -> int:
    tok = Tokenizer.from_file(llama3_tokenizer_path())
    stops = sorted(tok.stop_ids)
    report = {"vocab_size": tok.vocab_size, "threads": 1, "llguidance": llguidance_figures(tok, stops)}
    if os.environ.get("XGRAMMAR_PATH"):
        sys.path.insert(0, os.environ["XGRAMMAR_PATH"])
        report["xgrammar"] = xgrammar_figures(tok, stops)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
