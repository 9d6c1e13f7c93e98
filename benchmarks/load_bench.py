"""`herd bench load`: a concurrency sweep through the served path against the same requests in-process.

    herd bench load                                   # self-hosted: local Ray + Serve + herd, one demo replica
    herd bench load --concurrency 1,8,32 --out bench-out/load
    herd bench load --overload                        # + the past-capacity figure (rejection latency)
    herd bench load --autoscale                       # the model autoscaled 1..2, replica count over time
    herd bench load --address HOST:PORT [--model PATH] # drive a running cluster (in-process only with --model)
    herd bench load --engine-hop-only                 # the replica's engine client alone: no Serve, no gRPC

At every concurrency level C, C streams stay in flight (closed loop) until `--requests-per-level` requests
finished (default max(4·C, 64): each stream runs about four requests back to back, so a level measures the
steady state rather than one wave's ramp-up and tail, which alone swung 64-stream runs between 0.54 and 0.77
of in-process on the same commit). Each level reports the whole level's tok/s and `steady_tokens_per_s`, the rate
while all its streams were busy (bench_common.steady_tokens_per_s: from the first request's end to the last one's
start, without the first wave's ramp-up and the last one's drain), on both sides; the target compares the steady
rates. Every request has its own random prompt of `--prompt-tokens` tokens (no prefix-cache help) and
generates exactly `--max-tokens` tokens (greedy, ignore_eos). The clients are grpc.aio streams in one event
loop; the loop's wake-up lag is reported so a saturated client is visible as such.

The in-process baseline runs the same requests through `workers.Engine` (add_request/step, C in flight) in a
separate process, with the engine settings the served replica gets from its ModelDeploymentConfig and the
thread count its CPU reservation gives it; it loads once, and runs each level right before the served side
runs it (the served cluster idle meanwhile), so that both see the machine of the same minute. Self-hosted, the
processes are placed as a local `herd serve` places them (`--cpu-binding`, cluster.cpu_binding); the baseline's
process is started before that, and runs on any CPU. Self-hosted, each level also reports `cpu_cores`: the
cores used by the model replica, the ingress, Serve's proxy and controller, the bench's clients and the rest of
the machine while it ran (where the machine's CPU goes when the served path is slower than the engine alone),
and `cpu_ms_per_request`: each of them per request, and `serving_path` (proxy + ingress + replica), what a
request costs in front of the engine.

With `--engine-hop-only` the served side is only the hop a model replica itself makes: the engine client its
replica streams from (cluster.deployment.load_engine: the engine process, its two pipes, the stream pacing),
driven from this process's event loop, with no Ray, Serve, ingress or gRPC in front. Beside a full run it
splits the gap to in-process between the engine hop and the serving path in front of it.

With `--overload` a second model with a small capacity (max_num_seqs 2, queues 2 + 2) is served beside it, and
the rejections' latency (call to RESOURCE_EXHAUSTED) is measured two ways (`overload()`): sustained, new
requests arriving at `--overload-rate`/s while the model is kept full (the "past capacity" figure), and a burst
of `--overload-streams` streams at once.

Output: load_bench.json in `--out` (or the JSON on stdout without --out), load_bench.png (tok/s and TTFT
against concurrency), load_autoscale.png with --autoscale. Progress goes to stderr. The demo checkpoints
have random weights: the figures measure the serving path, not a real model's speed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

from benchmarks.bench_args import (concurrency_levels, cpu_list_arg, non_negative_float, non_negative_int,
                                   positive_float, positive_int, range_ratio)
from benchmarks.bench_common import (BENCH_MODEL, AioTarget, LoopLag, ProcessCpu, StreamResult, TimelineSampler,
                                     checkpoint_vocab, closed_loop, cluster_config, cpu_ms_per_request, demo_checkpoint,
                                     figure_path, local_ray, log, p50_p99_ms, pyplot, random_prompts,
                                     replica_counts, save_figure, serve_process_pids, start_herd,
                                     stream_summary, write_report)
from cluster.cpu_binding import CPU_BINDING_MODES, DEFAULT_CPU_BINDING, DEFAULT_SERVING_CPUS, engine_threads
from cluster.local_ray import DEFAULT_SERVE_TRANSPORT, SERVE_TRANSPORTS, env_set

CAPPED_MODEL = "bench-capped"
CAPPED_LIMITS = {"max_num_seqs": 2, "max_queued_requests": 2, "serve_max_queued_requests": 2}
# Tokens each of the clients keeping the capped model full asks for: long streams (seconds), so that the
# model has no free seat between one of them ending and the next starting for most of the sustained phase.
HOLDER_TOKENS = 1024
TARGET_CONCURRENCY, TARGET_FRACTION, TARGET_REJECTION_P99_MS = 64, 0.85, 100.0


def model_entry(path: str, args, name: str = BENCH_MODEL, **overrides) -> dict[str, Any]:
    """The ModelDeploymentConfig dict of the served model (its engine settings are the in-process ones too)."""
    levels = parse_levels(args.concurrency)
    entry: dict[str, Any] = {
        "name": name, "path": path, "resources_per_shard": {"CPU": args.replica_cpus},
        "max_model_len": args.prompt_tokens + longest_max_tokens(args) + 16,
        "max_num_seqs": args.max_num_seqs or max(levels),
        "router": {"routing_stats_period_s": 1.0},
    }
    if getattr(args, "stream_max_messages_per_s", None) is not None:
        entry["stream_max_messages_per_s"] = args.stream_max_messages_per_s
    if getattr(args, "stream_max_interval_s", None) is not None:
        entry["stream_max_interval_s"] = args.stream_max_interval_s
    if getattr(args, "engine_process", None) is not None:
        entry["engine_process"] = args.engine_process
    if getattr(args, "engine_cpu_cores", None) is not None:
        entry["engine_cpu_cores"] = args.engine_cpu_cores
    if getattr(args, "autoscale", False) and name == BENCH_MODEL:
        entry["autoscaling_config"] = {
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": args.target_ongoing_requests,
            "upscale_delay_s": 1.0, "downscale_delay_s": 5.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
    else:
        entry["num_replicas"] = 1
    entry.update(overrides)
    return entry


def engine_kwargs(entry: dict[str, Any]) -> dict[str, Any]:
    """Engine.from_pretrained keyword arguments of a served model entry (what its replica builds)."""
    from cluster.app import model_spec
    from cluster.config import ModelDeploymentConfig

    spec = model_spec(ModelDeploymentConfig(**entry))
    return {"dtype": spec.dtype, **spec.engine_args, "show_progress": False}


def parse_levels(levels: str | list[int]) -> list[int]:
    """--concurrency's stream counts: a list once argparse has parsed them (bench_args.concurrency_levels); text
    (as args built by hand may hold) is checked the same way."""
    return concurrency_levels(levels) if isinstance(levels, str) else list(levels)


# Requests per stream at a level, by default (module doc).
STEADY_STATE_ROUNDS = 4


def requests_for(level: int, args) -> int:
    return args.requests_per_level or max(STEADY_STATE_ROUNDS * level, 64)


def level_prompts(level: int, args, vocab: int) -> list[list[int]]:
    return random_prompts(requests_for(level, args), args.prompt_tokens, vocab, seed=args.seed * 1000 + level)


def level_max_tokens(level: int, args) -> list[int]:
    """Each request's max_tokens at a level, the same on both sides: all --max-tokens, or with
    --max-tokens-range-ratio R uniform in [max_tokens·(1-R), max_tokens·(1+R)] (vLLM's benchmark's
    --random-range-ratio). Equal lengths started together finish together, so a closed loop's clients come back
    in waves; mixed lengths spread them as real traffic does."""
    import random

    ratio = args.max_tokens_range_ratio
    n = requests_for(level, args)
    if ratio <= 0:
        return [args.max_tokens] * n
    rng = random.Random(args.seed * 1000 + level + 1)
    low = max(1, round(args.max_tokens * (1 - ratio)))
    return [rng.randint(low, longest_max_tokens(args)) for _ in range(n)]


def longest_max_tokens(args) -> int:
    return round(args.max_tokens * (1 + args.max_tokens_range_ratio))


# ---- in-process baseline (its own process) ------------------------------------------------------------------
def _in_process_levels(path: str, kwargs: dict[str, Any], threads: int, args_d: dict[str, Any],
                       commands: mp.Queue, out: mp.Queue) -> None:
    """The baseline's process: load the engine once, then run each level `commands` names (None: stop)."""
    import torch

    from workers import Engine, SamplingParams

    torch.set_num_threads(threads)  # what the replica's CPU reservation gives it (Ray sets OMP_NUM_THREADS)
    engine = Engine.from_pretrained(path, **kwargs)
    args = _Args(args_d)
    vocab = engine.vocab_size
    warm = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(random_prompts(2, args.prompt_tokens, vocab, seed=-1), warm)  # warm-up
    out.put("ready")
    while (level := commands.get()) is not None:
        params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
                  for m in level_max_tokens(level, args)]
        out.put(_in_process_level(engine, params, level, level_prompts(level, args, vocab)))
    engine.shutdown()


def _in_process_level(engine, params: list, level: int, prompts: list[list[int]]) -> dict[str, Any]:
    """One level through Engine.add_request / step, `level` requests in flight (closed loop); request i with
    params[i]."""
    results = [StreamResult() for _ in prompts]
    active: dict[str, tuple[int, float, Optional[float]]] = {}
    pending = iter(range(len(prompts)))
    t0 = time.perf_counter()

    def admit() -> None:  # top up to `level` requests in flight
        while len(active) < level and (i := next(pending, None)) is not None:
            results[i].start = time.perf_counter() - t0
            active[engine.add_request(prompts[i], params[i])] = (i, time.perf_counter(), None)

    admit()
    while active:
        deltas = engine.step()
        now = time.perf_counter()
        for d in deltas:
            i, start, last = active[d.request_id]
            results[i].on_chunk(now - start, len(d.token_ids), last)
            active[d.request_id] = (i, start, now - start if d.token_ids else last)
            if d.finished:
                results[i].latency_s = now - start
                del active[d.request_id]
        admit()
    return stream_summary(results, time.perf_counter() - t0)


class _Args:
    """The few argparse fields the workload needs, rebuilt in the spawned process."""

    def __init__(self, d: dict[str, Any]):
        self.__dict__.update(d)


def _workload_fields(args) -> dict[str, Any]:
    return {k: getattr(args, k) for k in ("prompt_tokens", "max_tokens", "max_tokens_range_ratio",
                                          "requests_per_level", "seed")}


class InProcessBaseline:
    """The same requests through `workers.Engine` in a process of its own, started before anything is placed on
    CPUs (it runs wherever the OS puts it, alone) and asked for one level at a time: each level's baseline
    runs right before its served counterpart, so both see the machine of the same minute (run back to back,
    the baseline alone swung 2,488-3,810 tok/s at 64 streams between sweeps)."""

    def __init__(self, path: str, entry: dict[str, Any], args):
        ctx = mp.get_context("spawn")
        threads = engine_threads(entry["resources_per_shard"])
        self._commands, self._out = ctx.Queue(), ctx.Queue()
        self._process = ctx.Process(target=_in_process_levels, daemon=True, args=(
            path, engine_kwargs(entry), threads, _workload_fields(args), self._commands, self._out))
        self._process.start()
        self._wait()

    def __enter__(self) -> "InProcessBaseline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_level(self, level: int) -> dict[str, Any]:
        self._commands.put(level)
        return self._wait()

    async def level(self, level: int) -> dict[str, Any]:
        """run_level from an event loop (the wait is in a thread)."""
        report = await asyncio.to_thread(self.run_level, level)
        log(f"in-process c={level}: {report['tokens_per_s']} tok/s, ttft p50 {report['ttft_p50_ms']} ms")
        return report

    def close(self) -> None:
        self._commands.put(None)
        self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()

    @classmethod
    def unless_skipped(cls, path: str, entry: dict[str, Any], args):
        """The baseline as a context, or a context of None with --skip-in-process."""
        if args.skip_in_process:
            return contextlib.nullcontext(None)
        log("starting the in-process baseline ...")
        return cls(path, entry, args)

    def _wait(self) -> Any:
        while True:
            try:
                return self._out.get(timeout=5)
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"the in-process baseline exited ({self._process.exitcode})") from None


# ---- served ---------------------------------------------------------------------------------------------------
async def warm_up(target: AioTarget, args, vocab: int) -> None:
    warm = random_prompts(4, args.prompt_tokens, vocab, seed=-1)
    await closed_loop(lambda i: target.generate(warm[i], 2, timeout_s=args.timeout_s), len(warm), 2)


async def served_sweep(target: AioTarget, levels: list[int], args, vocab: int, in_flight: list[int],
                       cpu_groups: Optional[dict[str, list[int]]] = None) -> dict[int, dict[str, Any]]:
    """Each level's stream figures; with `cpu_groups` (role -> pids) also the cores each role used meanwhile."""
    report = {}
    for level in levels:
        prompts, max_tokens = level_prompts(level, args, vocab), level_max_tokens(level, args)
        t0 = time.perf_counter()
        cpu = ProcessCpu(cpu_groups) if cpu_groups else None
        with LoopLag() as lag:
            results, wall = await closed_loop(
                lambda i: target.generate(prompts[i], max_tokens[i], timeout_s=args.timeout_s, t0=t0),
                len(prompts), level, in_flight)
        report[level] = {**stream_summary(results, wall), **lag.summary()}
        per_request = ""
        if cpu is not None:
            cores = report[level]["cpu_cores"] = cpu.cores()
            cpu_ms = report[level]["cpu_ms_per_request"] = cpu_ms_per_request(cores, wall, len(results))
            if "serving_path" in cpu_ms:
                per_request = (f", serving path {cpu_ms['serving_path']} ms of CPU a request (proxy "
                               f"{cpu_ms['serve_proxy']}, ingress {cpu_ms['ingress']}, replica {cpu_ms['model_replica']})")
        log(f"served c={level}: {report[level]['tokens_per_s']} tok/s, ttft p50 {report[level]['ttft_p50_ms']} ms, "
            f"errors {report[level]['errors']}{per_request}")
    return report


async def level_rounds(level: int, repeats: int, served_level: Callable[[], Awaitable[dict[str, Any]]],
                       baseline: Optional[InProcessBaseline]) -> tuple[dict[str, Any], Optional[dict], list]:
    """`repeats` rounds of one level, each its in-process baseline (when there is one) and then the served side;
    the round whose steady ratio is the median (the lower of the two middle ones), and every round's figures.
    One round is one sample of a machine whose speed swings from minute to minute (the baseline alone went
    1,714-2,306 tok/s at 64 streams in four runs of an hour): the median of several says more than any one."""
    runs = []
    for i in range(repeats):
        local = await baseline.level(level) if baseline is not None else None
        served = await served_level()
        runs.append((served, local))
        if repeats > 1:
            log(f"c={level} round {i + 1}/{repeats}: steady ratio {_ratio(served, local, 'steady_tokens_per_s')}")
    if baseline is None or repeats == 1:
        return runs[0][0], runs[0][1], []
    by_ratio = sorted(runs, key=lambda r: _ratio(*r, "steady_tokens_per_s") or 0.0)
    chosen = by_ratio[(repeats - 1) // 2]
    rounds = [{"served_steady_tokens_per_s": s.get("steady_tokens_per_s"),
               "in_process_steady_tokens_per_s": l.get("steady_tokens_per_s"),
               "served_fraction_of_in_process": _ratio(s, l, "tokens_per_s"),
               "served_steady_fraction_of_in_process": _ratio(s, l, "steady_tokens_per_s"),
               "errors": sum(s["errors"].values()), "reported": s is chosen[0]}
              for s, l in runs]
    return chosen[0], chosen[1], rounds


async def levels_in_rounds(levels: list[int], repeats: int,
                           served_level: Callable[[int], Awaitable[dict[str, Any]]],
                           baseline: Optional[InProcessBaseline]) -> tuple[dict, Optional[dict], dict[int, list]]:
    """Each level in `repeats` rounds (level_rounds), each round's baseline right before its served side (the
    machine of the same minute): served and in-process figures (None without a baseline) and rounds, by level."""
    served, local, rounds = {}, ({} if baseline is not None else None), {}
    for level in levels:
        served[level], local_level, rounds[level] = await level_rounds(
            level, repeats, functools.partial(served_level, level), baseline)
        if local is not None:
            local[level] = local_level
    return served, local, rounds


def _ratio(served: dict[str, Any], local: Optional[dict[str, Any]], figure: str) -> Optional[float]:
    s, l = served.get(figure), (local or {}).get(figure)
    return round(s / l, 3) if s and l else None


def _refusals(results: list[StreamResult], wall_s: float) -> dict[str, Any]:
    """Who was refused and how fast (call to RESOURCE_EXHAUSTED), who was served, any other outcome."""
    rejected = [r.latency_s for r in results if r.code == "RESOURCE_EXHAUSTED"]
    summary = stream_summary(list(results), wall_s)
    return {"streams": len(results), "rejected": len(rejected), "served": summary["ok"], "errors": summary["errors"],
            **p50_p99_ms(rejected, "rejection")}


async def overload(target: AioTarget, args, vocab: int, capacity: int) -> dict[str, Any]:
    """Past a small model's capacity, two ways:
    - sustained: the model kept full (as many clients as its engine holds, running and queued, with long
      streams of HOLDER_TOKENS, each sending again as soon as its request ends, or 0.5 s after a refusal, as
      a client honouring retry-after would)
      while new requests arrive at `--overload-rate` per second for `--overload-s` seconds, an open loop: each
      arrival's refusal latency is what a client of an overloaded server waits to learn it (the "past
      capacity" target);
    - burst: `--overload-streams` streams at the idle model in the same instant, the worst case of a thundering
      herd, every refusal queued behind the others in Serve's proxy and the ingress."""
    prompts = random_prompts(args.overload_streams, args.prompt_tokens, vocab, seed=args.seed + 99)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(target.generate(p, args.max_tokens, timeout_s=args.timeout_s) for p in prompts))
    burst = _refusals(list(results), time.perf_counter() - t0)
    await asyncio.sleep(1.0)

    stop = asyncio.Event()
    engine_holds = CAPPED_LIMITS["max_num_seqs"] + CAPPED_LIMITS["max_queued_requests"]
    holder_prompts = random_prompts(engine_holds, args.prompt_tokens, vocab, seed=args.seed + 98)

    async def hold(prompt: list[int]) -> None:  # one of the clients keeping the model full
        while not stop.is_set():
            r = await target.generate(prompt, HOLDER_TOKENS, timeout_s=args.timeout_s)
            if r.code != "OK":
                await asyncio.sleep(0.5)

    holders = [asyncio.create_task(hold(p)) for p in holder_prompts]
    await asyncio.sleep(1.0)  # the holders are in
    n = max(1, int(args.overload_rate * args.overload_s))
    arrival_prompts = random_prompts(n, args.prompt_tokens, vocab, seed=args.seed + 97)
    arrivals = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(arrival_prompts):  # open loop: on schedule, whatever the earlier ones do
        await asyncio.sleep(max(0.0, t0 + i / args.overload_rate - time.perf_counter()))
        arrivals.append(asyncio.create_task(target.generate(prompt, args.max_tokens, timeout_s=args.timeout_s)))
    sustained_results = await asyncio.gather(*arrivals)
    sustained = _refusals(list(sustained_results), time.perf_counter() - t0)
    stop.set()
    for holder in holders:  # their long streams are cancelled, not waited for
        holder.cancel()
    await asyncio.gather(*holders, return_exceptions=True)
    met = bool(sustained["rejected"]) and sustained["rejection_p99_ms"] < TARGET_REJECTION_P99_MS
    return {"model": CAPPED_MODEL, "limits": CAPPED_LIMITS, "capacity": capacity,
            "sustained": {"rate_per_s": args.overload_rate, "seconds": args.overload_s, **sustained},
            "burst": burst,
            "goal": f"sustained overload: rejection p99 < {TARGET_REJECTION_P99_MS:.0f} ms", "met": met}


def merge_levels(levels: list[int], served: dict, local: Optional[dict], args,
                 rounds: Optional[dict[int, list]] = None) -> list[dict[str, Any]]:
    """One row per level; with --repeats, the median round's figures and `rounds`, every round's ratios."""
    rows = []
    for level in levels:
        row: dict[str, Any] = {"concurrency": level, "requests": requests_for(level, args), "served": served[level]}
        if local is not None:
            row["in_process"] = local[level]
            for key, figure in (("served_fraction_of_in_process", "tokens_per_s"),
                                ("served_steady_fraction_of_in_process", "steady_tokens_per_s")):
                row[key] = _ratio(served[level], local[level], figure)
        if rounds and rounds.get(level):
            row["rounds"] = rounds[level]
        rows.append(row)
    return rows


def target_check(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goal: at 64 streams, served tok/s >= 85% of in-process with 0 errors (if 64 was measured). The rate
    compared is the steady one, while all 64 streams are busy on both sides (bench_common.steady_tokens_per_s);
    the whole level's ratio, which also counts how fast the first 64 requests got through at once, is beside it."""
    row = next((r for r in rows if r["concurrency"] == TARGET_CONCURRENCY), None)
    out: dict[str, Any] = {"goal": f"at {TARGET_CONCURRENCY} streams >= {TARGET_FRACTION:.0%} of in-process tok/s "
                                   "(steady state), 0 errors", "measured": row is not None}
    if row is not None:
        frac = row.get("served_steady_fraction_of_in_process")
        errors = sum(row["served"]["errors"].values())
        out.update(fraction=frac, whole_level_fraction=row.get("served_fraction_of_in_process"), errors=errors,
                   met=frac is not None and frac >= TARGET_FRACTION and errors == 0)
        if row.get("rounds"):  # --repeats: the fraction is the median round's; errors in any round count
            out["round_fractions"] = [r["served_steady_fraction_of_in_process"] for r in row["rounds"]]
            out["errors"] = errors = sum(r["errors"] for r in row["rounds"])
            out["met"] = out["met"] and errors == 0
    return out


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str, served_label: str = "served (gRPC)") -> Path:
    plt = pyplot()
    c = [r["concurrency"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3), dpi=110)
    ax1.plot(c, [r["served"]["tokens_per_s"] for r in rows], "o-", color="#1f5fa8", label=served_label)
    if all("in_process" in r for r in rows):
        ax1.plot(c, [r["in_process"]["tokens_per_s"] for r in rows], "s--", color="#555", label="in-process Engine")
    ax1.set(xlabel="concurrent streams", ylabel="generated tokens / s", title="throughput")
    for name, style, color in (("ttft_p50_ms", "o-", "#1f5fa8"), ("ttft_p99_ms", "^-", "#c0392b")):
        ax2.plot(c, [r["served"][name] for r in rows], style, color=color, label=f"served {name[5:8]}")
        if all("in_process" in r for r in rows):
            ax2.plot(c, [r["in_process"][name] for r in rows], style.replace("-", "--"), color=color, alpha=0.5,
                     label=f"in-process {name[5:8]}")
    ax2.set(xlabel="concurrent streams", ylabel="time to first token (ms)", title="TTFT")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(c, [str(x) for x in c])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- the engine hop alone (--engine-hop-only) ------------------------------------------------------------------
class EngineHopTarget:
    """A model replica's own engine client (what ModelServer streams from), called from this event loop: the
    served path without Ray, Serve, the ingress or gRPC. Its errors are the engine's typed ones, named here by
    the gRPC status the ingress would give them."""

    def __init__(self, engine):
        self.engine = engine

    async def generate(self, prompt: list[int], max_tokens: int, *, timeout_s: float = 120.0,
                       t0: float = 0.0) -> StreamResult:
        from cluster.errors import to_api_error
        from workers import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        res = StreamResult(start=start - t0)

        async def consume() -> None:
            last = None
            async for d in self.engine.generate(prompt, params):
                now = time.perf_counter() - start
                res.on_chunk(now, len(d.token_ids), last)
                last = now if d.token_ids else last

        try:
            await asyncio.wait_for(consume(), timeout_s)
        except asyncio.TimeoutError:
            res.code = "DEADLINE_EXCEEDED"
        except Exception as e:  # noqa: BLE001 - the engine's typed errors, as a client would see them
            res.code = to_api_error(e).code
        res.latency_s = time.perf_counter() - start
        return res


def _run_engine_hop(args, levels: list[int], path: str, report: dict[str, Any]) -> tuple[list, dict]:
    """The served side as one replica's engine client alone (module doc), placed as cpu_binding places a
    replica's engine; this process, the event loop its streams are read in, stands for the serving path."""
    from cluster.app import model_spec
    from cluster.config import ModelDeploymentConfig
    from cluster.deployment import load_engine, runs_engine_process

    entry = model_entry(path, args)
    report["engine"] = {k: v for k, v in engine_kwargs(entry).items() if k != "show_progress"}
    with InProcessBaseline.unless_skipped(path, entry, args) as baseline:
        if args.engine_cpu_cores is None:
            report["cpu_binding"] = bind_cpus([entry], args.cpu_binding, args.cpu_binding_serving_cpus)
        spec = model_spec(ModelDeploymentConfig(**entry))
        log("loading the replica's engine client ...")
        # The thread count a replica's engine gets from Ray's OMP_NUM_THREADS: an engine process inherits it; an
        # engine thread (--no-engine-process) computes in this process.
        threads, in_own_process = engine_threads(entry["resources_per_shard"]), runs_engine_process(spec)
        with env_set("OMP_NUM_THREADS", str(threads)):
            if not in_own_process:
                import torch
                torch.set_num_threads(threads)
            engine = load_engine(spec)
        report["engine_process"] = in_own_process
        cpu_groups = {"bench_client": [os.getpid()]}
        if in_own_process:
            cpu_groups["engine_process"] = [engine.pid]
        try:
            served, local, rounds = asyncio.run(levels_beside_baseline(
                EngineHopTarget(engine), levels, args, engine.vocab_size, baseline, cpu_groups))
        finally:
            engine.shutdown()
    return merge_levels(levels, served, local, args, rounds), {}


# ---- the run --------------------------------------------------------------------------------------------------
def run(args) -> int:
    levels = parse_levels(args.concurrency)
    if args.engine_hop_only:
        clash = [flag for flag, given in (("--address", args.address), ("--autoscale", args.autoscale),
                                          ("--overload", args.overload),
                                          ("--serving-cpu-cores", args.serving_cpu_cores)) if given]
        if clash:
            print(f"herd bench load: --engine-hop-only runs no cluster; it does not go with {', '.join(clash)}",
                  file=sys.stderr)
            return 2
    report: dict[str, Any] = {"bench": "load", "commit": git_commit(), "concurrency": levels,
                              "workload": {**_workload_fields(args), "timeout_s": args.timeout_s}}
    with demo_checkpoint(args.shape, None if args.address else args.model) as path:
        if args.address:
            report.update(mode="external", address=args.address, model=args.served_model)
            rows, extra = _run_external(args, levels)
        elif args.engine_hop_only:
            report.update(mode="engine-hop", checkpoint=args.model or f"demo:{args.shape}",
                          replica_cpus=args.replica_cpus)
            with own_cpus_kept():
                rows, extra = _run_engine_hop(args, levels, path, report)
        else:
            report.update(mode="self-hosted", checkpoint=args.model or f"demo:{args.shape}",
                          replica_cpus=args.replica_cpus)
            with own_cpus_kept():
                rows, extra = _run_self_hosted(args, levels, path, report)
    report["levels"] = rows
    report["target"] = target_check(rows) if not args.engine_hop_only else {
        "measured": False, "why": "--engine-hop-only: the target is the served path's, which this run leaves out"}
    report.update(extra)
    title = f"herd bench load: {report.get('checkpoint') or args.served_model}"
    served_label = "engine hop (no Serve, no gRPC)" if args.engine_hop_only else "served (gRPC)"
    report["png"] = str(plot_sweep(rows, figure_path(args.out, "load_bench.png"), title, served_label))
    write_report(report, args.out, "load_bench.json")
    return 0


@contextlib.contextmanager
def own_cpus_kept() -> Iterator[None]:
    """This process's CPUs as they were, after a self-hosted run moved it onto the serving CPUs (a caller, a test
    in one process, goes on where it was)."""
    cpus = os.sched_getaffinity(0)
    try:
        yield
    finally:
        os.sched_setaffinity(0, cpus)


def _run_self_hosted(args, levels: list[int], path: str, report: dict[str, Any]) -> tuple[list, dict]:
    entry = model_entry(path, args)
    report["engine"] = {k: v for k, v in engine_kwargs(entry).items() if k != "show_progress"}
    # Before anything below places this process (and so its children) on CPUs.
    with InProcessBaseline.unless_skipped(path, entry, args) as baseline:
        return _serve_and_sweep(args, levels, path, report, entry, baseline)


def _serve_and_sweep(args, levels: list[int], path: str, report: dict[str, Any], entry: dict[str, Any],
                     baseline: Optional[InProcessBaseline]) -> tuple[list, dict]:
    from cluster.app import APP_NAME, deployment_name
    from cluster.config import ModelDeploymentConfig

    models = [entry]
    capped = None
    if args.overload:
        capped = model_entry(path, args, name=CAPPED_MODEL, num_replicas=1, **CAPPED_LIMITS,
                             max_model_len=args.prompt_tokens + HOLDER_TOKENS + 16)
        models.append(capped)
    extra: dict[str, Any] = {}
    n_replicas = 2 if args.autoscale else 1
    cpus = int(args.replica_cpus * (n_replicas + len(models) - 1)) + 2
    vocab = checkpoint_vocab(path)
    if args.serving_cpu_cores:
        # This process, the local Ray it starts and everything in it (Serve's proxy, the ingress, the replicas)
        # on these CPUs; an engine process moves to its engine_cpu_cores itself.
        from workers.cpu_affinity import parse_cpu_list
        os.sched_setaffinity(0, parse_cpu_list(args.serving_cpu_cores))
        report["serving_cpu_cores"] = args.serving_cpu_cores
    elif args.engine_cpu_cores is None:
        report["cpu_binding"] = bind_cpus(models, args.cpu_binding, args.cpu_binding_serving_cpus)
    report["serve_transport"] = args.serve_transport
    report["ingress_replicas"] = args.ingress_replicas
    with local_ray(num_cpus=max(cpus, 4), serve_transport=args.serve_transport):
        log("starting the herd app ...")
        address = start_herd(cluster_config(models, serve_transport=args.serve_transport,
                                            ingress_replicas=args.ingress_replicas))
        in_flight = [0]
        sampler = None
        if args.autoscale:
            dep = deployment_name(BENCH_MODEL)
            sampler = TimelineSampler(lambda: replica_counts(APP_NAME, dep), lambda: in_flight[0]).start()

        async def drive():
            target = AioTarget(address, BENCH_MODEL)
            await target.wait_ready()
            await warm_up(target, args, vocab)
            phases = []
            cpu_groups = serve_process_pids(BENCH_MODEL)

            async def served_level(level: int) -> dict[str, Any]:  # one level at a time: the timeline names it
                start = sampler.now() if sampler else 0.0
                report = await served_sweep(target, [level], args, vocab, in_flight, cpu_groups)
                phases.append((f"c={level}", start, sampler.now() if sampler else 0.0))
                return report[level]

            served, local, rounds = await levels_in_rounds(levels, args.repeats, served_level, baseline)
            await target.close()
            if capped is not None:
                capped_target = AioTarget(address, CAPPED_MODEL)
                await capped_target.wait_ready()
                extra["overload"] = await overload(capped_target, args, vocab,
                                                   ModelDeploymentConfig(**capped).capacity)
                o = extra["overload"]
                log(f"overload: sustained {o['sustained']['rejected']} rejected, p99 "
                    f"{o['sustained']['rejection_p99_ms']} ms; burst {o['burst']['rejected']} rejected, p99 "
                    f"{o['burst']['rejection_p99_ms']} ms")
                await capped_target.close()
            return served, local, rounds, phases

        served, local, rounds, phases = asyncio.run(drive())
        if sampler is not None:
            time.sleep(args.cooldown_s)  # let the autoscaler come back down while sampling
            tl = sampler.stop()
            tl.phases = phases + [("idle", phases[-1][2], tl.t[-1] if tl.t else phases[-1][2])]
            extra["autoscale"] = _autoscale_report(tl, args)
    return merge_levels(levels, served, local, args, rounds), extra


def bind_cpus(models: list[dict[str, Any]], mode: str, serving_cpus: int) -> dict[str, Any]:
    """The cluster config's cpu_binding, applied as `herd serve` applies it (cluster.cpu_binding): this process
    (and so the local Ray it starts) on the serving CPUs, each bound model entry with its engine_cpu_cores."""
    from cluster import cpu_binding
    from cluster.config import ModelDeploymentConfig

    binding = cpu_binding.bind_this_process([ModelDeploymentConfig(**m) for m in models], mode, serving_cpus,
                                            say=lambda line: log(f"CPU binding: {line}"))
    if binding is None:
        return {"mode": mode, "applied": False}
    cores = binding.engine_cpu_cores
    for m in models:
        if m["name"] in cores:
            m["engine_cpu_cores"] = cores[m["name"]]
    return {"mode": mode, "serving_cpus_min": serving_cpus, "applied": binding.active,
            "serving": cpu_binding.format_cpus(binding.serving), "engines": binding.engines,
            "floating": binding.floating, "unbound": binding.unbound}


def _autoscale_report(tl, args) -> dict[str, Any]:
    from benchmarks.serve_bench import plot_timeline

    png = plot_timeline(tl, figure_path(args.out, "load_autoscale.png"),
                        "herd bench load --autoscale: replicas (min 1 / max 2) under the sweep")
    return {"png": str(png), "peak_replicas": max(tl.replicas or [0]),
            "final_replicas": tl.replicas[-1] if tl.replicas else None, "samples": len(tl.t),
            "timeline": asdict(tl)}


async def levels_beside_baseline(target, levels: list[int], args, vocab: int,
                                 baseline: Optional[InProcessBaseline],
                                 cpu_groups: Optional[dict[str, list[int]]] = None
                                 ) -> tuple[dict, Optional[dict], dict[int, list]]:
    """Warm up, then each level served, each right after its in-process baseline (when there is one), in
    --repeats rounds (level_rounds)."""
    await warm_up(target, args, vocab)

    async def served_level(level: int) -> dict[str, Any]:
        return (await served_sweep(target, [level], args, vocab, [0], cpu_groups))[level]

    return await levels_in_rounds(levels, args.repeats, served_level, baseline)


def _run_external(args, levels: list[int]) -> tuple[list, dict]:
    async def drive(baseline: Optional[InProcessBaseline]):
        target = AioTarget(args.address, args.served_model, api_key=args.api_key)
        info = await target.wait_ready()
        try:
            return await levels_beside_baseline(target, levels, args, info.vocab_size, baseline)
        finally:
            await target.close()

    baseline = (InProcessBaseline.unless_skipped(args.model, model_entry(args.model, args), args) if args.model
                else contextlib.nullcontext(None))
    with baseline as b:
        served, local, rounds = asyncio.run(drive(b))
    return merge_levels(levels, served, local, args, rounds), {}


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("load", help="concurrency sweep: served tok/s, TTFT, inter-token latency vs the same "
                                          "requests in-process; past-capacity rejections (JSON + PNG)")
    p.add_argument("--concurrency", type=concurrency_levels, default="1,8,32,64,128,256",
                   help="comma-separated stream counts")
    p.add_argument("--requests-per-level", type=positive_int, default=None, help="default: max(4 x level, 64)")
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--max-tokens", type=positive_int, default=64, help="generated tokens per request (ignore_eos)")
    p.add_argument("--max-tokens-range-ratio", type=range_ratio, default=0.0,
                   help="R in [0, 1): each request's max_tokens uniform in [max_tokens*(1-R), max_tokens*(1+R)], "
                        "the same requests on both sides (default 0: all equal)")
    p.add_argument("--model", default=None, help="checkpoint folder instead of the demo (self-hosted), or the "
                                                 "in-process baseline's checkpoint with --address")
    p.add_argument("--shape", default="llama32-1b-mini", help="demo checkpoint shape (written to a temp folder)")
    p.add_argument("--address", default=None, help="HOST:PORT of a running cluster (default: self-hosted)")
    p.add_argument("--served-model", default=BENCH_MODEL, help="model name to request, with --address")
    p.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"), help="with --address")
    p.add_argument("--replica-cpus", type=positive_float, default=1.0,
                   help="self-hosted: CPU reservation (= torch threads) of the replica and the in-process engine")
    p.add_argument("--max-num-seqs", type=positive_int, default=None,
                   help="engine batch size (default: the largest level)")
    p.add_argument("--stream-max-messages-per-s", type=non_negative_float, default=None,
                   help="the served model's stream pacing (default: herd's; 0 = a message per token)")
    p.add_argument("--stream-max-interval-s", type=positive_float, default=None,
                   help="the longest a stream's tokens wait under load (default: herd's)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="the served engine in a process of its own (default: the config's, on)")
    p.add_argument("--engine-cpu-cores", default=None, type=cpu_list_arg,
                   help="self-hosted: CPUs of the served engine process, a cpu list (e.g. 1 or 2-7; model key "
                        "engine_cpu_cores)")
    p.add_argument("--serving-cpu-cores", default=None, type=cpu_list_arg,
                   help="self-hosted: CPUs of everything else served (this bench, Ray, Serve's proxy, the "
                        "ingress, the replica), a cpu list (e.g. 0); as `taskset -c 0 herd serve`")
    p.add_argument("--cpu-binding", choices=CPU_BINDING_MODES, default=DEFAULT_CPU_BINDING,
                   help="self-hosted: the cluster config's cpu_binding, as herd serve applies it (unless "
                        "--engine-cpu-cores / --serving-cpu-cores place the processes)")
    p.add_argument("--cpu-binding-serving-cpus", type=positive_int, default=DEFAULT_SERVING_CPUS,
                   help="self-hosted: the cluster config's cpu_binding_serving_cpus (CPUs the serving path keeps)")
    p.add_argument("--serve-transport", choices=SERVE_TRANSPORTS, default=DEFAULT_SERVE_TRANSPORT,
                   help="self-hosted: the cluster config's serve_transport (Serve's hops between herd's processes)")
    p.add_argument("--ingress-replicas", type=positive_int, default=1,
                   help="self-hosted: the cluster config's ingress_replicas")
    p.add_argument("--timeout-s", type=positive_float, default=120.0, help="deadline of each request")
    p.add_argument("--autoscale", action="store_true", help="autoscale the model (min 1, max 2); plot replicas")
    p.add_argument("--target-ongoing-requests", type=positive_float, default=16.0, help="with --autoscale")
    p.add_argument("--cooldown-s", type=non_negative_float, default=8.0,
                   help="with --autoscale: idle sampling after the sweep")
    p.add_argument("--overload", action="store_true", help="also measure rejections past a small model's capacity")
    p.add_argument("--overload-streams", type=positive_int, default=32, help="--overload: the burst's streams")
    p.add_argument("--overload-rate", type=positive_float, default=20.0,
                   help="--overload: arrivals per second while the capped model is kept full")
    p.add_argument("--overload-s", type=positive_float, default=10.0, help="--overload: seconds of sustained arrivals")
    p.add_argument("--repeats", type=positive_int, default=1,
                   help="rounds of each level, each beside its own in-process baseline; the median round's "
                        "figures are reported, every round's ratios under `rounds`")
    p.add_argument("--skip-in-process", action="store_true", help="no in-process baseline")
    p.add_argument("--engine-hop-only", action="store_true",
                   help="the served side is the replica's engine client alone, driven from this process (no Ray, "
                        "Serve or gRPC): how much of the gap is the engine hop")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default=None, help="folder for load_bench.json and the PNGs (default: JSON to stdout, "
                                               "PNGs to the current folder)")
    p.set_defaults(func=run)
