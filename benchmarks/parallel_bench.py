"""`herd bench parallel`: TP / PP layouts on the CPU here, the driver→worker hop, per-shard memory.

Prints JSON: for TP1, TP2, PP2 and TP2×PP2 on one checkpoint, the mean decode-step latency and tokens/s of
a fixed batch, each shard's RSS; every sharded layout is run twice, with the step delivered as plain actor
calls (`use_compiled_graph=False`, `decode_step_ms_plain`) and through a Ray Compiled Graph
(`use_compiled_graph=True`, `decode_step_ms_compiled`); `mode_*` records the path the executor actually took.
Last, the round trip of an empty driver→worker call, plain actor call vs compiled graph (what a step pays
before any model work).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
SHAPE = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=2048, dtype="float32")


def _step_latency(path: str, tp: int, pp: int, batch: int, new_tokens: int, compiled: bool | None = None) -> dict:
    from workers import Engine, SamplingParams
    extra = {} if tp * pp == 1 else {"use_compiled_graph": compiled}
    engine = Engine.from_pretrained(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32",
                                    show_progress=False, resources_per_shard={"CPU": 0.5}, enable_prefix_caching=False,
                                    **extra)
    try:
        prompts = [[(7 * i + j) % 7000 + 3 for j in range(64)] for i in range(batch)]
        engine.generate(prompts[:2], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
        engine.step()  # the prefill step
        times, tokens = [], 0
        while engine.has_unfinished():
            t0 = time.perf_counter()
            tokens += len(engine.step())
            times.append(time.perf_counter() - t0)
        stats = engine.executor.shard_stats()
        return {"layout": f"TP{tp}xPP{pp}", "decode_step_ms": 1e3 * statistics.mean(times),
                "tok_per_s": tokens / sum(times),
                "shard_rss_mib": [round(s.get("rss_bytes", 0) / 2**20) for s in stats] if tp * pp > 1 else None,
                "shard_weight_mib": [round(s["weight_bytes"] / 2**20, 1) for s in stats],
                "mode": getattr(engine.executor, "mode", "tasks" if tp * pp > 1 else "local")}
    finally:
        engine.shutdown()


def _hop_overhead(calls: int = 300) -> dict:
    import ray
    from ray.dag import InputNode

    @ray.remote(num_cpus=0.1)
    class Echo:
        def echo(self, x):
            return x

    actor = Echo.remote()
    payload = {"input_ids": list(range(64)), "positions": list(range(64))}
    ray.get(actor.echo.remote(payload))
    t0 = time.perf_counter()
    for _ in range(calls):
        ray.get(actor.echo.remote(payload))
    plain = (time.perf_counter() - t0) / calls
    with InputNode() as inp:
        dag = actor.echo.bind(inp)
    compiled = dag.experimental_compile()
    try:
        ray.get(compiled.execute(payload))
        t0 = time.perf_counter()
        for _ in range(calls):
            ray.get(compiled.execute(payload))
        cg = (time.perf_counter() - t0) / calls
    finally:
        compiled.teardown()
        ray.kill(actor)
    return {"plain_actor_call_ms": plain * 1e3, "compiled_graph_ms": cg * 1e3}


def run(args) -> int:
    import ray
    from workers.demo import hf_config, write_checkpoint
    path = args.model
    if not path:
        path = str(Path(tempfile.mkdtemp(prefix="herd-bench-par-")) / "model")
        write_checkpoint(path, hf_config(**SHAPE))
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        result = {"model": path, "batch": args.batch, "layouts": []}
        for tp, pp in LAYOUTS:
            if tp * pp == 1:
                r = _step_latency(path, tp, pp, args.batch, args.new_tokens)
            else:  # the same layout, step delivered both ways
                plain = _step_latency(path, tp, pp, args.batch, args.new_tokens, compiled=False)
                cg = _step_latency(path, tp, pp, args.batch, args.new_tokens, compiled=True)
                r = {**cg, "decode_step_ms": None, "tok_per_s": None,
                     "decode_step_ms_plain": plain["decode_step_ms"], "decode_step_ms_compiled": cg["decode_step_ms"],
                     "tok_per_s_plain": plain["tok_per_s"], "tok_per_s_compiled": cg["tok_per_s"],
                     "mode_plain": plain["mode"], "mode_compiled": cg["mode"]}
                r = {k: v for k, v in r.items() if v is not None and k != "mode"}
            print(json.dumps(r), flush=True)
            result["layouts"].append(r)
        result["driver_to_worker_hop"] = _hop_overhead()
        print(json.dumps(result, indent=2))
    finally:
        ray.shutdown()
    return 0


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("parallel", help="TP/PP step latency, driver→worker hop, per-shard RSS (JSON)")
    p.add_argument("--model", default=None, help="checkpoint (default: a generated ~30M-parameter model)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs for the local Ray")
    p.set_defaults(func=run)
