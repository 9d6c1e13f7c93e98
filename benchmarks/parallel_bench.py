"""`herd bench parallel`: TP / PP shard groups on this machine's CPU, as JSON.

Three parts:
- layouts: TP1 (in-process) vs TP2 vs PP2 vs TP2×PP2 on one generated checkpoint, each parallel layout with
  the compiled-graph and the plain-actor-call step fan-out: prefill step, median decode step, tokens/s,
  and each shard's RSS;
- hop: the driver→workers cost of one step with nothing to compute (a decode-sized `StepInput` to 4 no-op
  actors and the logits back) — plain actor calls vs a compiled graph;
- activations: moving one stage's hidden states to the next stage — through the object store (the
  driver passes the reference on), a compiled-graph channel, and torch.distributed send/recv (gloo).

CPU figures say nothing about GPU speed; they show the fixed costs of the machinery (what the driver hop
and the transports cost) and that PP/TP scale at all on few cores.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.bench_args import positive_int
from benchmarks.bench_common import log, write_json

# ~100M parameters: matmuls dominate a decode step, yet four shards fit in a small CI machine's memory.
BENCH_SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048)
# (tp, pp, use_compiled_graph, num_microbatches): each parallel layout with both step fan-outs (auto
# micro-batching: big steps split, decode whole), and the PP layouts once more with every step split into
# one micro-batch per stage, decode included (see docs/parallel.md for why that is not the default).
LAYOUTS = [(1, 1, None, None),
           (2, 1, True, None), (2, 1, False, None),
           (1, 2, True, None), (1, 2, False, None), (1, 2, False, 2),
           (2, 2, True, None), (2, 2, False, None), (2, 2, False, 2)]


def _median_ms(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e3, 3)


def _decode_step_input(num_seqs: int, ctx_len: int = 128, block_size: int = 16):
    from workers.model_runner import StepInput
    blocks = -(-ctx_len // block_size)
    step = StepInput()
    for i in range(num_seqs):
        table = list(range(i * blocks, (i + 1) * blocks))
        step.input_ids.append(5 + i)
        step.positions.append(ctx_len - 1)
        step.slot_mapping.append(table[-1] * block_size + (ctx_len - 1) % block_size)
        step.num_decode += 1
        step.decode_block_tables.append(table)
        step.decode_seq_lens.append(ctx_len)
        step.sample_indices.append(i)
    return step


# ---- layouts ---------------------------------------------------------------------------------------------

def bench_layout(path: str, tp: int, pp: int, compiled: bool | None, microbatches: int | None, *, batch: int,
                 prompt_len: int, new_tokens: int) -> dict:
    from workers import Engine, SamplingParams
    shard_cpu = max(0.1, min(1.0, (os.cpu_count() or 2) / (tp * pp)))
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32",
                                    show_progress=False, enable_prefix_caching=False, kv_cache_memory=64 << 20,
                                    resources_per_shard={"CPU": shard_cpu}, use_compiled_graph=compiled,
                                    num_microbatches=microbatches)
    build_s = time.perf_counter() - t0
    try:
        vocab = engine.vocab_size
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        engine.generate([[7] * 8], SamplingParams(max_tokens=2, ignore_eos=True))   # warm-up
        for i in range(batch):
            engine.add_request([(31 * i + j) % (vocab - 3) + 3 for j in range(prompt_len)], params)
        steps, start = [], time.perf_counter()
        while engine.has_unfinished():
            s = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - s)
        total = time.perf_counter() - start
        if tp * pp > 1:
            shards = engine.executor.shard_stats()
            rss = {f"rank{s['rank']}": round(s["rss_bytes"] / 2**20, 1) for s in shards}
            weights = {f"rank{s['rank']}": round(s["weight_bytes"] / 2**20, 1) for s in shards}
        else:
            rss = {"rank0 (driver)": round(psutil.Process().memory_info().rss / 2**20, 1)}
            weights = {"rank0": round(engine.executor.runner.model.weight_bytes() / 2**20, 1)}
        mode = getattr(engine.executor, "mode", "in-process")
    finally:
        engine.shutdown()
    return {"layout": f"TP{tp}" + (f"xPP{pp}" if pp > 1 else ""), "tp": tp, "pp": pp, "fan_out": mode,
            "microbatches": ("auto" if microbatches is None else microbatches) if pp > 1 else 1,
            "build_s": round(build_s, 2), "prefill_step_ms": round(steps[0] * 1e3, 1),
            "decode_step_ms_median": _median_ms(steps[1:]), "decode_steps": len(steps) - 1,
            "tok_per_s": round(batch * new_tokens / total, 1), "seconds": round(total, 2),
            "shard_rss_mib": rss, "shard_weights_mib": weights}


# ---- driver -> workers hop ---------------------------------------------------------------------------------

def _define_actors():
    import ray

    @ray.remote(num_cpus=0.1)
    class NoOpShard:
        """Receives a step and does nothing; the last one returns decode-sized fp32 logits as the real last
        stage does (a numpy array)."""

        def __init__(self, logits_shape=None):
            import numpy as np
            self.logits = np.zeros(logits_shape, dtype=np.float32) if logits_shape else None

        def execute(self, step):
            return self.logits

        def ping(self):
            return 0

        def pid(self):
            return os.getpid()

    @ray.remote(num_cpus=0.1)
    class Stage:
        """Hands a [tokens, hidden] activation to the next stage, three ways."""

        def __init__(self):
            self.cache = {}

        def init(self, rank: int, port: int):
            import torch.distributed as dist
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                    timeout=datetime.timedelta(seconds=60))

        def hidden(self, n: int, h: int):
            import torch
            if (n, h) not in self.cache:
                self.cache[(n, h)] = torch.randn(n, h)
            return self.cache[(n, h)]

        def produce(self, shape):
            return self.hidden(*shape)

        def consume(self, shape, hidden):
            return hidden.shape[0]

        def send(self, shape):
            import torch.distributed as dist
            dist.send(self.hidden(*shape), dst=1)
            return None

        def recv(self, shape):
            import torch
            import torch.distributed as dist
            buf = torch.empty(shape)
            dist.recv(buf, src=0)
            return buf.shape[0]

        def noop(self, shape):
            return None

    return NoOpShard, Stage


def _time_calls(fn, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    xs = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t)
    return _median_ms(xs)


def bench_hop(iters: int, vocab: int) -> dict:
    import ray
    from ray.dag import InputNode, MultiOutputNode
    NoOpShard, _ = _define_actors()
    step = _decode_step_input(16)
    out = {"step_input": "decode batch of 16 sequences, 128-token contexts", "logits_shape": [16, vocab]}
    for n in (1, 4):
        for returns_logits in (False, True):
            shape = (16, vocab) if returns_logits else None
            actors = [NoOpShard.remote(None) for _ in range(n - 1)] + [NoOpShard.remote(shape)]
            ray.get([a.ping.remote() for a in actors])
            tasks = _time_calls(lambda: ray.get([a.execute.remote(step) for a in actors]), iters)
            with InputNode() as inp:
                dag = MultiOutputNode([a.execute.bind(inp) for a in actors])
            compiled = dag.experimental_compile()
            try:
                cg = _time_calls(lambda: ray.get(compiled.execute(step)), iters)
                # What a shard's resident graph loop costs while it waits for the next step.
                proc = psutil.Process(ray.get(actors[0].pid.remote()))
                proc.cpu_percent()
                time.sleep(1.0)
                idle_cpu = proc.cpu_percent()
            finally:
                compiled.teardown()
            for a in actors:
                ray.kill(a)
            key = f"{n}_shards_" + ("step_and_logits" if returns_logits else "step_only")
            out[key] = {"actor_calls_ms": tasks, "compiled_graph_ms": cg,
                        "compiled_graph_idle_shard_cpu_percent": round(idle_cpu, 1)}
    return out


def bench_activations(iters: int, hidden: int) -> dict:
    import ray
    from ray.dag import InputNode, MultiOutputNode
    from workers.parallel.distributed import free_port
    _, Stage = _define_actors()
    a, b = Stage.remote(), Stage.remote()
    port = free_port("127.0.0.1")
    ray.get([a.init.remote(0, port), b.init.remote(1, port)], timeout=120)
    out = {"hidden_size": hidden, "dtype": "float32"}
    for tokens in (16, 512):
        shape = (tokens, hidden)
        ray.get(a.produce.remote(shape))
        row = {"mib": round(tokens * hidden * 4 / 2**20, 2)}
        row["baseline_two_noop_calls_ms"] = _time_calls(lambda: ray.get([a.noop.remote(shape), b.noop.remote(shape)]), iters)
        row["object_store_ms"] = _time_calls(lambda: ray.get(b.consume.remote(shape, a.produce.remote(shape))), iters)
        row["gloo_send_recv_ms"] = _time_calls(lambda: ray.get([a.send.remote(shape), b.recv.remote(shape)]), iters)
        # The same three inside a compiled graph: a no-op baseline, the graph's own channel a -> b, and gloo
        # send/recv between the two (what the executor does: the graph carries the step, gloo the activations).
        graphs = {}
        with InputNode() as inp:
            graphs["compiled_graph_baseline_ms"] = MultiOutputNode([a.noop.bind(inp), b.noop.bind(inp)])
        with InputNode() as inp:
            graphs["compiled_graph_channel_ms"] = b.consume.bind(inp, a.produce.bind(inp))
        with InputNode() as inp:
            graphs["compiled_graph_gloo_send_recv_ms"] = MultiOutputNode([a.send.bind(inp), b.recv.bind(inp)])
        for name, dag in graphs.items():
            compiled = dag.experimental_compile()
            try:
                row[name] = _time_calls(lambda: ray.get(compiled.execute(shape)), iters)
            finally:
                compiled.teardown()
        out[f"{tokens}_tokens"] = row
    ray.kill(a)
    ray.kill(b)
    return out


# ---- entry point -------------------------------------------------------------------------------------------

def run(args) -> int:
    import ray
    import torch
    from cluster.ray_node_start import init_local_ray
    from workers.demo import hf_config, write_checkpoint
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    tmp = None
    if args.model:
        path = args.model
    else:
        tmp = tempfile.TemporaryDirectory(prefix="herd-bench-parallel-")
        path = str(write_checkpoint(Path(tmp.name) / "model", hf_config(**BENCH_SHAPE, dtype="float32")))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "ray": ray.__version__, "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
              "model": {"path": args.model or "generated", **({} if args.model else BENCH_SHAPE)},
              "workload": {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}}
    rows = []

    def layout(tp, pp, compiled, microbatches):
        rows.append(bench_layout(path, tp, pp, compiled, microbatches, batch=args.batch,
                                 prompt_len=args.prompt_len, new_tokens=args.new_tokens))
        if args.verbose_rows:
            log(json.dumps(rows[-1]))

    try:
        # The in-process layout first, before Ray (and the workers it prestarts) compete for the cores.
        layout(*LAYOUTS[0])
        init_local_ray(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                       _node_ip_address="127.0.0.1", log_to_driver=False)
        time.sleep(5)   # let the prestarted workers finish importing
        for spec in LAYOUTS[1:]:
            layout(*spec)
        result["layouts"] = rows
        result["driver_worker_hop"] = bench_hop(args.iters, BENCH_SHAPE["vocab_size"])
        result["activation_transport"] = bench_activations(max(20, args.iters // 5), args.hidden)
        result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        ray.shutdown()
        if tmp is not None:
            tmp.cleanup()
    write_json(result, args.out)
    return 0


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("parallel", help="TP/PP shard groups on the CPU: step latency, driver hop, "
                                              "activation transport, shard RSS (JSON)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: a generated ~100M-parameter model)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--prompt-len", type=positive_int, default=64)
    p.add_argument("--new-tokens", type=positive_int, default=32)
    p.add_argument("--iters", type=positive_int, default=200, help="calls per driver-hop measurement")
    p.add_argument("--hidden", type=positive_int, default=4096, help="hidden size of the activation-transport test")
    p.add_argument("--out", default=None, help="write the JSON to this file (default: stdout)")
    p.add_argument("--verbose-rows", action="store_true", help="log each layout's row (stderr) as it finishes")
    p.set_defaults(func=run)
