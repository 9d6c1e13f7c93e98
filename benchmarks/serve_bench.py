"""`herd bench serve`: the serving cluster under concurrent multi-turn chat sessions, over gRPC.

Each session opens with a system prompt shared by all sessions, then (with `--session-tokens N`) its own
N-token document, as in document QA, RAG or an agent's long context, then asks `--turns` questions. A turn's
prompt is the whole conversation so far (the system prompt, the document, the previous questions, the model's
replies, and the new question). A router that sends a session back to the replica holding its conversation
turns most of each prompt into prefix-cache hits (`GenerateResponse.usage.cached_tokens`); with long
per-session documents a router blind to the cache re-prefills a session's document on every replica the
session visits, while a shared system prompt alone is soon cached on every replica whatever the router.

    herd bench serve                         # self-hosted: local Ray + Serve with a demo model, four phases
    herd bench serve --address HOST:PORT --model NAME [--ray-address auto]   # drive a running cluster

Self-hosted phases (one local Ray):
  1. router comparison, for each of `--replicas R [R ...]` (e.g. 2 4): the same workload with herd's
     PrefixCacheRouter, Serve's default PowerOfTwoChoices router and a round-robin baseline
     (benchmarks/baseline_routers.py). Reports TTFT p50/p99, generated tokens/s, requests (turns)/s, the
     cached-token fraction of the prompts and failed requests; `hit_rate_vs_ideal`, the cached tokens as a
     fraction of those of an ideal single replica (the same workload against one replica, which holds every
     conversation: the most any router can reach; decoding is greedy, so every run holds the same
     conversations); and
     `throughput_vs_default` (generated tokens/s over the default router's; `requests_vs_default` likewise for
     turns/s). Plotted to routers.png.
     Targets (issue 13, on a prefix-heavy workload): hit_rate_vs_ideal >= 0.9, throughput_vs_default >= 1.5.
  2. gRPC overhead: sequential single requests through the cluster (gRPC proxy -> ingress -> model replica)
     against the same requests through an in-process AsyncEngine on the same checkpoint.
  3. autoscale timeline: the deployment autoscaled (min 1 .. `--max-replicas`) under a load ramp (low, high,
     idle). Running replicas and in-flight requests are sampled every 0.5 s and plotted to
     autoscale_timeline.png.
Against a running cluster: phase 1 with whatever router that cluster uses, plus phase 3's sampling of its
replica count if `--ray-address` lets the bench read `serve.status()`.

The JSON report goes to stdout, or to serve_bench.json in `--out` (with autoscale_timeline.png, which
otherwise lands in the current folder); progress goes to stderr. The demo checkpoints are
random-weight, so the absolute numbers measure the serving path, not a real model's speed.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.bench_args import non_negative_float, non_negative_int, positive_float, positive_int
from benchmarks.bench_common import (Timeline, TimelineSampler, figure_path, free_port,  # noqa: F401
                                     local_ray, log, percentile, pyplot, replica_counts, save_figure,
                                     scratch_dir, write_report)

DEFAULT_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
PREFIX_ROUTER = "cluster.routing:PrefixCacheRouter"
ROUND_ROBIN_ROUTER = "benchmarks.baseline_routers:RoundRobinRouter"
# Phase 1's routers, compared at each replica count.
ROUTERS = (("prefix_router", PREFIX_ROUTER), ("default_router", DEFAULT_ROUTER),
           ("round_robin", ROUND_ROBIN_ROUTER))
BENCH_MODEL = "bench"


# ---- workload ----------------------------------------------------------------------------------------------
@dataclass
class Workload:
    sessions: int = 6
    turns: int = 4
    system_tokens: int = 256
    session_tokens: int = 0   # each session's own document after the system prompt (0: none, the old workload)
    user_tokens: int = 128
    max_tokens: int = 16
    seed: int = 0
    think_s: float = 0.05   # each turn waits uniform(0, think_s) first: users pause, sessions do not march in step

    def longest_request(self) -> int:
        """Tokens of the last turn's prompt plus its output: what max_model_len must hold."""
        return (self.system_tokens + self.session_tokens + self.turns * self.user_tokens
                + self.turns * self.max_tokens)


@dataclass
class TurnResult:
    session: int
    turn: int
    ttft_s: Optional[float] = None
    latency_s: Optional[float] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error: Optional[str] = None


def summarize(results: list[TurnResult], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    followups = [r for r in ok if r.turn > 0]
    f_prompt = sum(r.prompt_tokens for r in followups)
    # A follow-up with under half its prompt cached went to a replica without its conversation.
    cold = [r for r in followups if r.cached_tokens * 2 < r.prompt_tokens]
    cold_by_turn: dict[str, int] = {}
    for r in cold:
        cold_by_turn[str(r.turn)] = cold_by_turn.get(str(r.turn), 0) + 1
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1

    def ms(x):
        return None if x is None else round(x * 1000, 2)

    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": errors,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p99_ms": ms(percentile(ttft, 99)),
        "latency_p50_ms": ms(percentile([r.latency_s for r in ok if r.latency_s is not None], 50)),
        "generated_tokens": sum(r.completion_tokens for r in ok),
        "tokens_per_s": round(sum(r.completion_tokens for r in ok) / wall_s, 2) if wall_s > 0 else None,
        "requests_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "prompt_tokens": prompt,
        "cached_fraction": round(sum(r.cached_tokens for r in ok) / prompt, 4) if prompt else None,
        "cached_fraction_followups": (round(sum(r.cached_tokens for r in followups) / f_prompt, 4)
                                      if f_prompt else None),
        "followups_cold": len(cold),
        "followups_cold_by_turn": dict(sorted(cold_by_turn.items(), key=lambda kv: int(kv[0]))),
        "wall_s": round(wall_s, 3),
    }


class GrpcTarget:
    """One model behind herd's gRPC API (cluster/pb stubs)."""

    def __init__(self, address: str, model: str, api_key: Optional[str] = None):
        import grpc

        from cluster.pb import inference_pb2 as pb
        from cluster.pb import inference_pb2_grpc as pb_grpc

        self.pb, self.grpc = pb, grpc
        self.address, self.model = address, model
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    def close(self) -> None:
        self.channel.close()

    def model_info(self, timeout_s: float = 120.0) -> Any:
        """Waits until the cluster answers ListModels with this model."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                for m in self.stub.ListModels(self.pb.ListModelsRequest(), metadata=self.metadata, timeout=10).models:
                    if m.name == self.model:
                        return m
                last = f"model {self.model!r} not listed"
            except self.grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(0.5)
        raise RuntimeError(f"{self.address} did not serve {self.model!r} within {timeout_s:.0f} s ({last})")

    def generate(self, prompt: list[int], max_tokens: int, timeout_s: float = 120.0) -> tuple[TurnResult, list[int]]:
        pb, res, out = self.pb, TurnResult(session=-1, turn=-1), []
        req = pb.GenerateRequest(model=self.model, token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        try:
            for chunk in self.stub.Generate(req, metadata=self.metadata, timeout=timeout_s):
                if chunk.token_ids and res.ttft_s is None:
                    res.ttft_s = time.perf_counter() - t0
                out.extend(chunk.token_ids)
                if chunk.finish_reason:
                    res.prompt_tokens = chunk.usage.prompt_tokens
                    res.completion_tokens = chunk.usage.completion_tokens
                    res.cached_tokens = chunk.usage.cached_tokens
            res.latency_s = time.perf_counter() - t0
        except self.grpc.RpcError as e:
            res.error = e.code().name
        return res, out


def run_sessions(generate: Callable[[list[int], int], tuple[TurnResult, list[int]]], w: Workload, vocab: int,
                 in_flight: Optional[list[int]] = None, stop: Optional[threading.Event] = None,
                 loop: bool = False) -> tuple[list[TurnResult], float]:
    """`w.sessions` concurrent sessions of `w.turns` turns (repeated while `loop` until `stop`). A session's first
    prompt is the shared system prompt, its own `w.session_tokens`-token document and a question; each later
    prompt is the previous one + the reply + a new question. Session s draws from Random(seed * 1000 + s),
    the document first, so `session_tokens=0` gives the same prompts as before the option existed."""
    rng = random.Random(w.seed)
    low = 3 if vocab > 16 else 0
    system = [rng.randrange(low, vocab) for _ in range(w.system_tokens)]
    results: list[TurnResult] = []
    lock = threading.Lock()

    def session(s: int) -> None:
        r = random.Random(w.seed * 1000 + s)
        while True:
            document = [r.randrange(low, vocab) for _ in range(w.session_tokens)]
            history = system + document + [r.randrange(low, vocab) for _ in range(w.user_tokens)]
            for turn in range(w.turns):
                if stop is not None and stop.is_set():
                    return
                if w.think_s > 0:
                    time.sleep(r.uniform(0, w.think_s))
                if in_flight is not None:
                    with lock:
                        in_flight[0] += 1
                try:
                    res, reply = generate(history, w.max_tokens)
                finally:
                    if in_flight is not None:
                        with lock:
                            in_flight[0] -= 1
                res.session, res.turn = s, turn
                with lock:
                    results.append(res)
                history = history + reply + [r.randrange(low, vocab) for _ in range(w.user_tokens)]
            if not loop:
                return

    threads = [threading.Thread(target=session, args=(s,), daemon=True) for s in range(w.sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


# ---- autoscale timeline -------------------------------------------------------------------------------------
def autoscale_timeline(target: GrpcTarget, vocab: int, replicas_now: Callable[[], tuple[int, int]],
                       phases: list[tuple[str, float, int]], period_s: float = 0.5,
                       max_tokens: int = 16) -> Timeline:
    """Runs `phases` (name, seconds, concurrent sessions) back to back, sampling replicas and load."""
    in_flight = [0]
    sampler = TimelineSampler(replicas_now, lambda: in_flight[0], period_s).start()
    tl = sampler.tl
    for i, (name, seconds, sessions) in enumerate(phases):
        start = sampler.now()
        if sessions > 0:
            stop = threading.Event()
            w = Workload(sessions=sessions, turns=4, max_tokens=max_tokens, seed=100 + i)
            worker = threading.Thread(
                target=run_sessions, args=(lambda p, m: target.generate(p, m), w, vocab, in_flight, stop, True),
                daemon=True)
            worker.start()
            time.sleep(seconds)
            stop.set()
            worker.join(timeout=120)
        else:
            time.sleep(seconds)
        tl.phases.append((name, start, sampler.now()))
    return sampler.stop()


def plot_timeline(tl: Timeline, path: Path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    colors = {"low": "#e8f4ea", "high": "#fdecea", "idle": "#eef1f6"}
    for name, a, b in tl.phases:
        ax.axvspan(a, b, color=colors.get(name, "#f5f5f5"), zorder=0)
        ax.text((a + b) / 2, 0.02, name, transform=ax.get_xaxis_transform(), ha="center", fontsize=9,
                color="#555")
    if tl.wanted:
        ax.step(tl.t, tl.wanted, where="post", color="#1f5fa8", linewidth=1.2, linestyle="--",
                label="replicas running + starting")
    ax.step(tl.t, tl.replicas, where="post", color="#1f5fa8", linewidth=2.2, label="running replicas")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("running replicas", color="#1f5fa8")
    ax.set_ylim(0, max(tl.replicas + tl.wanted + [1]) + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax2 = ax.twinx()
    ax2.plot(tl.t, tl.in_flight, color="#c0392b", linewidth=1.2, alpha=0.85, label="requests in flight")
    ax2.set_ylabel("requests in flight (load)", color="#c0392b")
    ax2.set_ylim(0, max(tl.in_flight + [1]) * 1.25)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper right", fontsize=9)
    ax.set_title(title)
    return save_figure(fig, path)


# ---- in-process baseline ------------------------------------------------------------------------------------
def in_process_latencies(path: str, prompts: list[list[int]], max_tokens: int,
                         engine_kwargs: dict[str, Any]) -> list[TurnResult]:
    """The same requests, one at a time, through an AsyncEngine in this process (no Serve, no gRPC)."""
    import asyncio

    from workers import AsyncEngine, SamplingParams

    engine = AsyncEngine.from_pretrained(path, **engine_kwargs)

    async def one(prompt):
        res, t0 = TurnResult(session=0, turn=0), time.perf_counter()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for d in engine.generate(prompt, params):
            if d.token_ids and res.ttft_s is None:
                res.ttft_s = time.perf_counter() - t0
            res.completion_tokens += len(d.token_ids)
            if d.finished:
                res.prompt_tokens, res.cached_tokens = d.num_prompt_tokens, d.num_cached_tokens
        res.latency_s = time.perf_counter() - t0
        return res

    async def all_of_them():
        await one(prompts[0])  # warm-up
        return [await one(p) for p in prompts]

    try:
        return asyncio.run(all_of_them())
    finally:
        engine.shutdown()


def sequential(target: GrpcTarget, prompts: list[list[int]], max_tokens: int) -> list[TurnResult]:
    target.generate(prompts[0], max_tokens)  # warm-up
    return [target.generate(p, max_tokens)[0] for p in prompts]


def overhead_summary(grpc_results: list[TurnResult], local_results: list[TurnResult]) -> dict[str, Any]:
    def p50(rs, attr):
        return percentile([getattr(r, attr) for r in rs if r.error is None and getattr(r, attr) is not None], 50)

    out: dict[str, Any] = {"requests": len(grpc_results)}
    for attr in ("ttft_s", "latency_s"):
        g, l = p50(grpc_results, attr), p50(local_results, attr)
        name = attr[:-2]
        out[f"grpc_{name}_p50_ms"] = None if g is None else round(g * 1000, 2)
        out[f"in_process_{name}_p50_ms"] = None if l is None else round(l * 1000, 2)
        out[f"overhead_{name}_p50_ms"] = None if g is None or l is None else round((g - l) * 1000, 2)
    return out


# ---- self-hosted cluster ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _router_class(router: str):
    """Select the model deployments' router class for build_app.
    TODO: use the cluster config's router key once cluster/config.py has it; until then set the module
    constant that cluster.app reads when it builds the deployment options."""
    import cluster.app as app

    before = app.ROUTER_CLASS
    app.ROUTER_CLASS = router
    try:
        yield
    finally:
        app.ROUTER_CLASS = before


def bench_config(model_path: str, grpc_port: int, http_port: int, *, replicas: int,
                 autoscaling: Optional[dict] = None, max_model_len: int = 2048,
                 kv_blocks: Optional[int] = None) -> dict[str, Any]:
    model: dict[str, Any] = {
        "name": BENCH_MODEL, "path": model_path, "resources_per_shard": {"CPU": 0.25},
        "max_model_len": max_model_len, "router": {"routing_stats_period_s": 1.0},
    }
    if kv_blocks is not None:  # each replica's KV cache, in blocks (num_gpu_blocks_override)
        model["num_gpu_blocks_override"] = kv_blocks
    if autoscaling:
        model["autoscaling_config"] = autoscaling
    else:
        model["num_replicas"] = replicas
    return {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "models": [model]}


def _deploy(cfg_dict: dict[str, Any], router: str) -> None:
    from ray import serve

    from cluster.app import APP_NAME, build_app
    from cluster.config import ClusterConfig

    with _router_class(router):
        app = build_app(ClusterConfig.from_dict(cfg_dict))
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)


def _undeploy() -> None:
    from ray import serve

    from cluster.app import APP_NAME

    serve.delete(APP_NAME)


def run_self_hosted(args) -> dict[str, Any]:
    from ray import serve

    from cluster.app import APP_NAME, deployment_name, serve_start_options
    from cluster.config import ClusterConfig
    from workers.demo import write_demo_checkpoint

    model_path = args.checkpoint
    if model_path is None:
        # Kept in --out for the next run; a scratch folder removed at exit without it.
        model_path = str((Path(args.out) / "checkpoints" if args.out else scratch_dir()) / args.shape)
        if not (Path(model_path) / "config.json").is_file():
            write_demo_checkpoint(model_path, args.shape)
    grpc_port, http_port = free_port(), free_port()
    base = bench_config(model_path, grpc_port, http_port, replicas=args.replicas[0])
    w = _workload(args)
    report: dict[str, Any] = {"mode": "self-hosted", "checkpoint": model_path, "workload": asdict(w),
                              "replicas": list(args.replicas), "kv_blocks_per_replica": args.kv_blocks}

    with local_ray():
        serve.start(**serve_start_options(ClusterConfig.from_dict(base)))
        target = GrpcTarget(f"127.0.0.1:{grpc_port}", BENCH_MODEL)

        # 1. router comparison at each replica count, against an ideal single replica
        report["routers"] = compare_routers(model_path, grpc_port, http_port, args.replicas, w, target,
                                            args.out, kv_blocks=args.kv_blocks)
        if args.routers_only:
            target.close()
            return report

        # 2. gRPC overhead (the cluster first, then the in-process engine with the cluster gone)
        rng = random.Random(args.seed + 7)
        prompts = [[rng.randrange(3, 1000) for _ in range(64)] for _ in range(args.overhead_requests)]
        _deploy(base, PREFIX_ROUTER)
        target.model_info()
        grpc_results = sequential(target, prompts, args.max_tokens)
        _undeploy()
        engine_kwargs = {"max_model_len": base["models"][0]["max_model_len"], "show_progress": False}
        local_results = in_process_latencies(model_path, prompts, args.max_tokens, engine_kwargs)
        report["grpc_overhead"] = overhead_summary(grpc_results, local_results)
        log(json.dumps({"grpc_overhead": report["grpc_overhead"]}))

        # 3. autoscale timeline
        autoscaling = {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 2,
                       "upscale_delay_s": 1.0, "downscale_delay_s": args.downscale_delay_s,
                       "look_back_period_s": 2.0, "metrics_interval_s": 0.5,
                       "policy": {"policy_function": "cluster.autoscaling:llm_autoscaling_policy"}}
        _deploy(bench_config(model_path, grpc_port, http_port, replicas=1, autoscaling=autoscaling), PREFIX_ROUTER)
        info = target.model_info()
        dep = deployment_name(BENCH_MODEL)
        phases = [("low", args.phase_s, 1), ("high", args.phase_s * 2, args.high_sessions),
                  ("idle", args.phase_s + args.downscale_delay_s, 0)]
        tl = autoscale_timeline(target, info.vocab_size, lambda: replica_counts(APP_NAME, dep), phases,
                                max_tokens=args.max_tokens)
        _undeploy()
        png = plot_timeline(tl, figure_path(args.out, "autoscale_timeline.png"),
                            f"herd autoscaling: {BENCH_MODEL} ({args.shape}), min 1 / max {args.max_replicas}")
        report["autoscale"] = {"png": str(png), "peak_replicas": max(tl.replicas or [0]),
                               "final_replicas": tl.replicas[-1] if tl.replicas else None,
                               "peak_in_flight": max(tl.in_flight or [0]), "samples": len(tl.t),
                               "timeline": asdict(tl)}
        target.close()
    return report


def _run_once(cfg: dict[str, Any], router: str, w: Workload, target: GrpcTarget) -> dict[str, Any]:
    _deploy(cfg, router)
    try:
        info = target.model_info()
        results, wall = run_sessions(lambda p, m: target.generate(p, m), w, info.vocab_size)
    finally:
        _undeploy()
    summary = summarize(results, wall)
    summary["cached_tokens"] = sum(r.cached_tokens for r in results if r.error is None)
    # Every turn, for finding out why a router missed: [session, turn, TTFT ms, prompt tokens, cached tokens].
    summary["per_turn"] = [[r.session, r.turn, None if r.ttft_s is None else round(r.ttft_s * 1000, 1),
                            r.prompt_tokens, r.cached_tokens]
                           for r in sorted(results, key=lambda r: (r.session, r.turn)) if r.error is None]
    return summary


def compare_routers(model_path: str, grpc_port: int, http_port: int, replica_numbers: list[int], w: Workload,
                    target: GrpcTarget, out: Optional[str], kv_blocks: Optional[int] = None) -> dict[str, Any]:
    """Phase 1: the ideal single replica, then every router at every replica count (module doc). With
    `kv_blocks` each compared replica's KV cache holds that many blocks (a cache smaller than the sessions'
    working set, as GPU caches are under many sessions); the ideal stays unbounded: it holds every
    conversation."""
    max_model_len = max(2048, w.longest_request())   # a long document needs more (the demo shape must allow it)
    ideal = _run_once(bench_config(model_path, grpc_port, http_port, replicas=1, max_model_len=max_model_len),
                      PREFIX_ROUTER, w, target)
    log(json.dumps({"ideal_single_replica": ideal}))
    by_r: dict[str, Any] = {}
    for r in replica_numbers:
        cfg = bench_config(model_path, grpc_port, http_port, replicas=r, max_model_len=max_model_len,
                           kv_blocks=kv_blocks)
        runs = {}
        for label, router in ROUTERS:
            runs[label] = _run_once(cfg, router, w, target)
            runs[label]["hit_rate_vs_ideal"] = (round(runs[label]["cached_tokens"] / ideal["cached_tokens"], 4)
                                                if ideal["cached_tokens"] else None)
            log(json.dumps({f"R={r}": {label: runs[label]}}))
        default = runs["default_router"]
        for summary in runs.values():
            for key, ratio in (("tokens_per_s", "throughput_vs_default"), ("requests_per_s", "requests_vs_default")):
                mine, theirs = summary.get(key), default.get(key)
                summary[ratio] = round(mine / theirs, 3) if mine and theirs else None
        by_r[f"R={r}"] = runs
    png = plot_routers(by_r, figure_path(out, "routers.png"), w)
    return {"ideal_single_replica": ideal, "by_replicas": by_r, "png": str(png),
            "targets": {"hit_rate_vs_ideal": 0.9, "throughput_vs_default": 1.5}}


def plot_routers(by_r: dict[str, Any], path: Path, w: Workload) -> Path:
    """Cached tokens vs the ideal single replica, TTFT p50 / p99 and tokens/s, per router and replica count."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = [label for label, _ in ROUTERS]
    groups = list(by_r)
    width = 0.8 / max(1, len(labels))
    panels = (("hit_rate_vs_ideal", "cached tokens / ideal single replica", 1.0),
              ("ttft_p99_ms", "TTFT p99 (ms)", None), ("tokens_per_s", "generated tokens / s", None))
    for ax, (key, title, line) in zip(axes, panels):
        for i, label in enumerate(labels):
            values = [by_r[g][label].get(key) or 0 for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
        ax.set_xticks([x + width * (len(labels) - 1) / 2 for x in range(len(groups))])
        ax.set_xticklabels(groups)
        ax.set_title(title)
        if line is not None:
            ax.axhline(line, color="grey", linewidth=0.8, linestyle="--")
    axes[0].legend(fontsize=8, loc="lower left")
    document = f", {w.session_tokens}-token document per session" if w.session_tokens else ""
    fig.suptitle(f"herd bench serve: {w.sessions} sessions x {w.turns} turns, {w.system_tokens}-token shared "
                 f"system prompt{document}", fontsize=10)
    return save_figure(fig, path)


def run_against(args) -> dict[str, Any]:
    target = GrpcTarget(args.address, args.model, api_key=args.api_key)
    info = target.model_info()
    w = _workload(args)
    results, wall = run_sessions(lambda p, m: target.generate(p, m), w, info.vocab_size)
    report: dict[str, Any] = {"mode": "external", "address": args.address, "model": args.model,
                              "workload": asdict(w), "cluster_router": summarize(results, wall)}
    log(json.dumps({"cluster_router": report["cluster_router"]}))
    if args.ray_address:
        import ray

        from cluster.app import APP_NAME, deployment_name

        ray.init(address=args.ray_address, log_to_driver=False)
        try:
            phases = [("low", args.phase_s, 1), ("high", args.phase_s * 2, args.high_sessions),
                      ("idle", args.phase_s, 0)]
            tl = autoscale_timeline(target, info.vocab_size,
                                    lambda: replica_counts(APP_NAME, deployment_name(args.model)), phases,
                                    max_tokens=args.max_tokens)
            png = plot_timeline(tl, figure_path(args.out, "autoscale_timeline.png"), f"herd autoscaling: {args.model}")
            report["autoscale"] = {"png": str(png), "peak_replicas": max(tl.replicas or [0]),
                                   "timeline": asdict(tl)}
        finally:
            ray.shutdown()
    target.close()
    return report


def _workload(args) -> Workload:
    return Workload(sessions=args.sessions, turns=args.turns, system_tokens=args.system_tokens,
                    session_tokens=args.session_tokens, user_tokens=args.user_tokens, max_tokens=args.max_tokens,
                    seed=args.seed, think_s=args.think_s)


def run(args) -> int:
    report = run_against(args) if args.address else run_self_hosted(args)
    write_report(report, args.out, "serve_bench.json")
    return 0


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("serve", help="the cluster over gRPC: prefix vs default router, gRPC overhead, "
                                           "autoscale timeline (JSON + PNG)")
    p.add_argument("--address", default=None, help="HOST:PORT of a running cluster's gRPC (default: self-hosted)")
    p.add_argument("--model", default=BENCH_MODEL, help="model name, with --address")
    p.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"), help="with --address")
    p.add_argument("--ray-address", default=None, help="with --address: Ray cluster to read replica counts from")
    p.add_argument("--shape", default="llama32-1b-mini", help="self-hosted: demo checkpoint shape")
    p.add_argument("--checkpoint", default=None, help="self-hosted: checkpoint folder instead of a demo shape")
    p.add_argument("--replicas", type=positive_int, nargs="+", default=[2],
                   help="self-hosted: replica counts for the router comparison (e.g. --replicas 2 4)")
    p.add_argument("--routers-only", action="store_true",
                   help="self-hosted: only the router comparison (no gRPC-overhead or autoscale phases)")
    p.add_argument("--sessions", type=positive_int, default=6)
    p.add_argument("--turns", type=positive_int, default=4)
    p.add_argument("--system-tokens", type=non_negative_int, default=256, help="system prompt shared by all sessions")
    p.add_argument("--session-tokens", type=non_negative_int, default=0,
                   help="each session's own document after the system prompt (document QA / RAG); 0: none")
    p.add_argument("--user-tokens", type=positive_int, default=128, help="new tokens per turn")
    p.add_argument("--kv-blocks", type=positive_int, default=None,
                   help="router comparison: each replica's KV cache in blocks (default: what memory gives); "
                        "the ideal single replica stays unbounded")
    p.add_argument("--max-tokens", type=positive_int, default=16, help="generated tokens per turn")
    p.add_argument("--think-s", type=non_negative_float, default=0.05, help="max pause before each turn")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--overhead-requests", type=positive_int, default=20)
    p.add_argument("--max-replicas", type=positive_int, default=3, help="autoscale timeline: max replicas")
    p.add_argument("--high-sessions", type=positive_int, default=8,
                   help="autoscale timeline: sessions in the high phase")
    p.add_argument("--phase-s", type=positive_float, default=10.0, help="autoscale timeline: length of the low phase")
    p.add_argument("--downscale-delay-s", type=non_negative_float, default=5.0)
    p.add_argument("--out", default=None, help="folder for serve_bench.json and the PNG (default: JSON to stdout, "
                                               "PNG in the current folder)")
    p.set_defaults(func=run)
