"""`herd bench soak` and `herd bench fault`: the served path over time and through a lost replica.

    herd bench soak --minutes 10 --out bench-out/soak   # steady mixed load; RSS and free KV blocks over time
    herd bench fault --out bench-out/fault              # 2 replicas under load, one killed mid-run

soak: `--streams` concurrent streams for `--minutes`, each request drawn at random: a prompt of 8..`--max-prompt`
tokens and 1..`--max-tokens` new tokens; `--cancel-fraction` of them cancelled by the client after a few tokens,
`--invalid-fraction` with a token id outside the vocabulary or max_tokens 0 (INVALID_ARGUMENT expected),
`--deadline-fraction` with a deadline of 20..300 ms (DEADLINE_EXCEEDED expected, OK if it made it). Of the
valid ones (cancelled and deadline ones too), `--feature-fraction` use one of the served features
(benchmarks/soak_features.py: a JSON schema, a regex, a choice, n > 1, logprobs, stop strings, penalties and
logit_bias, a Chat whose tool call is required); what each one that ends OK said is checked against its
feature's contract, and a broken one counts as unexpected ("kind:feature:broken-output"). The model replica's
RSS (psutil on its pid, found in the GCS actor table) and the engine's free KV blocks
(ModelServer.stats()) are sampled every `--sample-s` before, during and after the load; the report says
whether free blocks came back to their starting count, and whether RSS stayed flat after warm-up: the
median of the last `--rss-window-s` of the load within `--rss-tolerance-mib` of the median of the first
window after warm-up, with the slope between (the replica trims freed heap pages every few seconds, so RSS
is a sawtooth; what first use allocates in warm-up stays), plus counts of each outcome and the unexpected ones.

fault: a model with 2 replicas under `--streams` closed-loop streams for `--duration-s`; at `--kill-at-s` one
replica actor is killed (ray.kill). Reported: failed requests by status, the window in which clients saw
errors (first to last error, from the kill), requests that reached their deadline (hung), and the time until
Serve had 2 RUNNING replicas again, the replacement among them.

Output: soak_bench.json + soak_bench.png / fault_bench.json + fault_bench.png in `--out` (JSON on stdout
without --out; PNGs then in the current folder).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.bench_args import (fraction, int_at_least, non_negative_float, non_negative_int, positive_float,
                                   positive_int, usage_error)
from benchmarks.bench_common import (BENCH_MODEL, AioTarget, StreamResult, TimelineSampler, checkpoint_vocab,
                                     closed_loop, cluster_config, demo_checkpoint, figure_path, local_ray, log,
                                     model_stats, p50_p99_ms, pyplot, replica_actors, replica_counts,
                                     save_figure, start_herd, stream_summary, write_report)
from benchmarks.soak_features import CHAT_PROMPT_TOKENS, draw_feature, violation

EXPECTED = {"normal": {"OK"}, "cancel": {"CANCELLED_BY_CLIENT", "OK"}, "invalid": {"INVALID_ARGUMENT"},
            "deadline": {"DEADLINE_EXCEEDED", "OK"}}


def _model(path: str, args, max_prompt: int, **extra) -> dict[str, Any]:
    return {"name": BENCH_MODEL, "path": path, "resources_per_shard": {"CPU": args.replica_cpus},
            "max_model_len": max_prompt + args.max_tokens + 16, "max_num_seqs": args.max_num_seqs,
            "router": {"routing_stats_period_s": 1.0}, **extra}


def outcome_counts(results: list[StreamResult]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """({kind: {code: n}}, {"kind:code": n} of outcomes outside EXPECTED, and "kind:feature:broken-output": n
    of streams whose output broke their feature's contract)."""
    by_kind: dict[str, dict[str, int]] = {}
    unexpected: dict[str, int] = {}
    for r in results:
        codes = by_kind.setdefault(r.kind, {})
        codes[r.code] = codes.get(r.code, 0) + 1
        if r.code not in EXPECTED.get(r.kind, {"OK"}):
            unexpected[f"{r.kind}:{r.code}"] = unexpected.get(f"{r.kind}:{r.code}", 0) + 1
        if r.violation is not None:
            key = f"{r.kind}:{r.feature}:broken-output"
            unexpected[key] = unexpected.get(key, 0) + 1
    return by_kind, unexpected


# ---- soak -----------------------------------------------------------------------------------------------------
class ReplicaProbe:
    """Samples the replica's RSS (with its engine process's, workers.engine_process: what the pod's memory
    limit counts) and the engine's KV / queue counters every `period_s`, in a thread."""

    def __init__(self, pid: Optional[int], period_s: float):
        import psutil

        self.proc = psutil.Process(pid) if pid else None
        self.procs = [self.proc, *self.proc.children()] if self.proc else []
        self.period_s = period_s
        self.t0 = time.monotonic()
        self.samples: dict[str, list] = {"t": [], "rss_mib": [], "kv_blocks_free": [], "num_running": [],
                                         "num_waiting": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, Any]:
        s = model_stats(BENCH_MODEL)
        row = {"t": round(time.monotonic() - self.t0, 3),
               "rss_mib": round(sum(p.memory_info().rss for p in self.procs) / 2**20, 1) if self.procs else None,
               "kv_blocks_free": s["kv_blocks_free"], "num_running": s["num_running"],
               "num_waiting": s["num_waiting"]}
        for k, v in row.items():
            self.samples[k].append(v)
        return row

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a missed sample is a gap, not a failed soak
                log(f"probe: {type(e).__name__}: {e}")
            self._stop.wait(self.period_s)

    def start(self) -> "ReplicaProbe":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def now(self) -> float:
        return time.monotonic() - self.t0


def soak_request(i: int, target: AioTarget, args, vocab: int, t0: float):
    """The i-th request of the mixed workload (deterministic in i and --seed)."""
    rng = random.Random(args.seed * 1_000_003 + i)
    prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(8, args.max_prompt))]
    max_tokens = rng.randint(1, args.max_tokens)
    roll = rng.random()
    kw: dict[str, Any] = {"timeout_s": args.timeout_s, "t0": t0}
    if roll < args.cancel_fraction:
        kind, max_tokens = "cancel", max(max_tokens, 4)
        kw["cancel_after_tokens"] = rng.randint(1, max_tokens - 1)
    elif roll < args.cancel_fraction + args.invalid_fraction:
        kind = "invalid"
        if rng.random() < 0.5:
            prompt[rng.randrange(len(prompt))] = vocab + rng.randrange(1000)
        else:
            max_tokens = 0
    elif roll < args.cancel_fraction + args.invalid_fraction + args.deadline_fraction:
        kind, max_tokens = "deadline", args.max_tokens
        kw["timeout_s"] = rng.uniform(0.02, 0.3)
    else:
        kind = "normal"
    feature = draw_feature(rng, target.pb) if kind != "invalid" and rng.random() < args.feature_fraction else None
    if feature is not None and feature.whole_budget and kind == "normal":
        max_tokens = args.max_tokens

    async def call() -> StreamResult:
        if feature is None:
            res = await target.generate(prompt, max_tokens, **kw)
        elif feature.chat is not None:
            res = await target.chat(max_tokens=max_tokens, capture=True, **feature.chat, **feature.sampling, **kw)
        else:
            res = await target.generate(prompt, max_tokens, capture=True, **feature.sampling, **kw)
        res.kind = kind
        if feature is not None:
            res.feature = feature.name
            if res.code == "OK" and kind != "cancel":
                res.violation = violation(feature, res.completions)
                res.whole_outputs = sum(c.finish_reason in ("stop", "tool_calls") for c in res.completions.values())
            res.completions = None   # checked; a 10-minute soak need not keep every text
        return res
    return call()


def feature_counts(results: list[StreamResult]) -> dict[str, Any]:
    """{"outcomes": {feature: {code: n}}, "whole_outputs": {feature: completions checked whole, not cut by
    max_tokens}, "violations": {feature: n}, "examples": [first few violations]}."""
    outcomes: dict[str, dict[str, int]] = {}
    whole: dict[str, int] = {}
    violations: dict[str, int] = {}
    examples: list[str] = []
    for r in results:
        if r.feature is None:
            continue
        codes = outcomes.setdefault(r.feature, {})
        codes[r.code] = codes.get(r.code, 0) + 1
        whole[r.feature] = whole.get(r.feature, 0) + r.whole_outputs
        if r.violation is not None:
            violations[r.feature] = violations.get(r.feature, 0) + 1
            if len(examples) < 10:
                examples.append(f"{r.feature}: {r.violation}")
    return {"outcomes": outcomes, "whole_outputs": whole, "violations": violations, "examples": examples}


def _drain(probe: ReplicaProbe, start_free: int, timeout_s: float) -> float:
    """Waits until the engine holds no request and its free blocks are back (or `timeout_s`); seconds taken."""
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        try:
            row = probe.sample()
            if row["num_running"] == 0 and row["num_waiting"] == 0 and row["kv_blocks_free"] == start_free:
                break
        except Exception:  # noqa: BLE001
            pass
        time.sleep(probe.period_s)
    return round(time.monotonic() - t, 2)


def run_soak(args) -> int:
    shares = args.cancel_fraction + args.invalid_fraction + args.deadline_fraction
    if shares > 1 + 1e-9:   # each request is one kind, its share cut from one roll in [0, 1)
        return usage_error("soak", f"--cancel-fraction + --invalid-fraction + --deadline-fraction must be <= 1, "
                                   f"got {shares:g}")
    from benchmarks.load_bench import git_commit

    duration_s = args.minutes * 60
    warmup_s = min(args.warmup_s, duration_s / 3)
    report: dict[str, Any] = {"bench": "soak", "commit": git_commit(), "minutes": args.minutes,
                              "streams": args.streams, "checkpoint": args.model or f"demo:{args.shape}",
                              "fractions": {"cancel": args.cancel_fraction, "invalid": args.invalid_fraction,
                                            "deadline": args.deadline_fraction, "feature": args.feature_fraction}}
    with demo_checkpoint(args.shape, args.model) as path, local_ray(num_cpus=4):
        log("starting the herd app ...")
        # A feature's Chat renders its tool into a prompt that may be longer than the token prompts.
        longest_prompt = max(args.max_prompt, CHAT_PROMPT_TOKENS if args.feature_fraction > 0 else 0)
        address = start_herd(cluster_config([_model(path, args, longest_prompt, num_replicas=1)]))
        vocab = checkpoint_vocab(path)
        total_blocks = model_stats(BENCH_MODEL)["kv_blocks_total"]
        actors = replica_actors(BENCH_MODEL)
        probe = ReplicaProbe(actors[0]["pid"] if actors else None, args.sample_s)
        for _ in range(3):
            probe.sample()
            time.sleep(args.sample_s)
        start = probe.sample()
        probe.start()
        t_load = probe.now()

        async def drive():
            target = AioTarget(address, BENCH_MODEL)
            await target.wait_ready()
            t0 = time.perf_counter()
            results, wall = await closed_loop(lambda i: soak_request(i, target, args, vocab, t0), None,
                                              args.streams, run_for_s=duration_s)
            await target.close()
            return results, wall

        log(f"soak: {args.streams} streams for {duration_s:.0f} s ...")
        results, wall = asyncio.run(drive())
        t_end = probe.now()
        probe.stop()
        drained_s = _drain(probe, start["kv_blocks_free"], args.drain_timeout_s)
        for _ in range(2):
            time.sleep(args.sample_s)
            end = probe.sample()
    s = probe.samples
    rss = rss_trend(s["t"], s["rss_mib"], t_load + warmup_s, t_end, args.rss_window_s)
    by_kind, unexpected = outcome_counts(results)
    report.update({
        "requests": len(results), "wall_s": round(wall, 2), "outcomes": by_kind, "unexpected": unexpected,
        "unexpected_total": sum(unexpected.values()), "features": feature_counts(results),
        "normal": {k: v for k, v in stream_summary([r for r in results if r.kind == "normal"], wall).items()
                   if k not in ("requests", "errors", "wall_s")},
        "kv_blocks": {"total": total_blocks, "free_start": start["kv_blocks_free"],
                      "free_min": min(s["kv_blocks_free"]), "free_end": end["kv_blocks_free"],
                      "returned": end["kv_blocks_free"] == start["kv_blocks_free"]},
        "rss_mib": {"start": start["rss_mib"], **rss,
                    "peak": max((r for r in s["rss_mib"] if r is not None), default=None),
                    "end": end["rss_mib"], "tolerance": args.rss_tolerance_mib,
                    "returned": (None if rss["last_window"] is None or rss["after_warmup"] is None
                                 else rss["last_window"] <= rss["after_warmup"] + args.rss_tolerance_mib)},
        "drained_s": drained_s, "phases": {"load": [t_load, t_end], "warmup_s": warmup_s},
        "samples": s,
    })
    report["png"] = str(plot_soak(s, t_load, t_end, warmup_s, figure_path(args.out, "soak_bench.png")))
    log(f"soak: {len(results)} requests, unexpected {unexpected}, kv returned {report['kv_blocks']['returned']}, "
        f"rss returned {report['rss_mib']['returned']}")
    write_report(report, args.out, "soak_bench.json")
    return 0


def rss_trend(t: list[float], rss: list[Optional[float]], t_from: float, t_to: float,
              window_s: float) -> dict[str, Optional[float]]:
    """RSS after warm-up: the median of the first and of the last `window_s` of the load, and the least-squares
    slope between them (MiB per minute). Medians over windows, not single samples: the replica hands freed
    memory back every few seconds (cluster.host_memory), so its RSS is a sawtooth whose single points differ by
    the tooth's height."""
    points = [(x, y) for x, y in zip(t, rss) if y is not None and t_from <= x <= t_to]
    first = [y for x, y in points if x <= t_from + window_s]
    last = [y for x, y in points if x >= t_to - window_s]
    slope = None
    if len(points) >= 2:
        mx = sum(x for x, _ in points) / len(points)
        my = sum(y for _, y in points) / len(points)
        var = sum((x - mx) ** 2 for x, _ in points)
        slope = round(60 * sum((x - mx) * (y - my) for x, y in points) / var, 2) if var else None
    return {"after_warmup": _median(first), "last_window": _median(last), "slope_mib_per_min": slope}


def _median(values: list[float]) -> Optional[float]:
    return round(sorted(values)[len(values) // 2], 1) if values else None


def plot_soak(s: dict[str, list], t_load: float, t_end: float, warmup_s: float, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    ax.axvspan(t_load, t_load + warmup_s, color="#fff4d6", zorder=0, label="warm-up")
    ax.axvspan(t_load + warmup_s, t_end, color="#fdecea", zorder=0, label="load")
    ax.plot(s["t"], s["rss_mib"], color="#1f5fa8", linewidth=1.8, label="replica RSS (MiB)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("replica RSS (MiB)", color="#1f5fa8")
    ax2 = ax.twinx()
    ax2.step(s["t"], s["kv_blocks_free"], where="post", color="#27864a", linewidth=1.4, label="free KV blocks")
    ax2.set_ylabel("free KV blocks", color="#27864a")
    ax2.set_ylim(0, max(s["kv_blocks_free"] + [1]) * 1.1)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], loc="lower right", fontsize=8)
    ax.set_title("herd bench soak: replica memory and KV blocks")
    return save_figure(fig, path)


# ---- fault ----------------------------------------------------------------------------------------------------
def kill_one_replica() -> dict[str, Any]:
    """ray.kill (no restart) of one replica actor of the bench model; Serve must start a replacement."""
    import ray

    victim = replica_actors(BENCH_MODEL)[0]
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    return victim


def wait_replaced(victim: str, replicas: int, timeout_s: float, period_s: float = 0.25) -> Optional[float]:
    """Seconds until `replicas` are RUNNING again, none of them the killed one; None on timeout."""
    from cluster.app import APP_NAME, deployment_name

    t0 = time.monotonic()
    dep = deployment_name(BENCH_MODEL)
    while time.monotonic() - t0 < timeout_s:
        try:
            running, wanted = replica_counts(APP_NAME, dep)
            names = {a["name"] for a in replica_actors(BENCH_MODEL)}
            if running == wanted == replicas and victim not in names and len(names) == replicas:
                return round(time.monotonic() - t0, 2)
        except Exception:  # noqa: BLE001 - the controller may be busy replacing it
            pass
        time.sleep(period_s)
    return None


def fault_summary(results: list[StreamResult], t_kill: float, deadline_s: float) -> dict[str, Any]:
    errors = [r for r in results if r.code != "OK"]
    ends = sorted(r.start + (r.latency_s or 0) for r in errors)
    by_code: dict[str, int] = {}
    for r in errors:
        by_code[r.code] = by_code.get(r.code, 0) + 1
    longest = max((r.latency_s or 0 for r in results), default=0)
    return {
        "requests": len(results), "failed": len(errors), "errors": by_code,
        # herd retries a request whose replica fails before its first token, so those should not fail at all
        "failed_before_first_token": sum(1 for r in errors if r.ttft_s is None),
        "first_error_after_kill_s": round(ends[0] - t_kill, 3) if ends else None,
        "last_error_after_kill_s": round(ends[-1] - t_kill, 3) if ends else None,
        "error_window_s": round(ends[-1] - ends[0], 3) if ends else 0.0,
        "reached_deadline": by_code.get("DEADLINE_EXCEEDED", 0), "deadline_s": deadline_s,
        "longest_request_s": round(longest, 3), "hung": longest >= deadline_s,
        **p50_p99_ms([r.latency_s for r in errors if r.latency_s is not None], "failure_latency"),
    }


def run_fault(args) -> int:
    if args.kill_at_s >= args.duration_s:
        return usage_error("fault", f"--kill-at-s must be below --duration-s ({args.duration_s:g}), "
                                    f"got {args.kill_at_s:g}")
    from benchmarks.load_bench import git_commit
    from benchmarks.serve_bench import plot_timeline
    from cluster.app import APP_NAME, deployment_name

    report: dict[str, Any] = {"bench": "fault", "commit": git_commit(), "streams": args.streams,
                              "replicas": 2, "checkpoint": args.model or f"demo:{args.shape}"}
    with demo_checkpoint(args.shape, args.model) as path, local_ray(num_cpus=4):
        log("starting the herd app with 2 replicas ...")
        address = start_herd(cluster_config([_model(path, args, args.prompt_tokens, num_replicas=2)]))
        vocab = checkpoint_vocab(path)
        in_flight = [0]
        dep = deployment_name(BENCH_MODEL)
        sampler = TimelineSampler(lambda: replica_counts(APP_NAME, dep), lambda: in_flight[0], 0.25).start()
        kill: dict[str, Any] = {}

        def killer():
            time.sleep(args.kill_at_s)
            kill["t"] = sampler.now()
            kill["victim"] = kill_one_replica()
            log(f"killed {kill['victim']['name']} (pid {kill['victim']['pid']})")
            kill["replaced_after_s"] = wait_replaced(kill["victim"]["name"], 2, args.recovery_timeout_s)

        async def drive():
            target = AioTarget(address, BENCH_MODEL)
            await target.wait_ready()
            rng = random.Random(args.seed)
            prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_tokens)] for _ in range(4096)]
            t0 = time.perf_counter() - sampler.now()  # StreamResult.start on the sampler's clock
            thread = threading.Thread(target=killer, daemon=True)
            thread.start()
            results, wall = await closed_loop(
                lambda i: target.generate(prompts[i % len(prompts)], args.max_tokens, timeout_s=args.deadline_s,
                                          t0=t0), None, args.streams, in_flight, run_for_s=args.duration_s)
            await target.close()
            await asyncio.to_thread(thread.join, args.recovery_timeout_s + args.kill_at_s)
            return results

        results = asyncio.run(drive())
        tl = sampler.stop()
    t_kill = kill.get("t", float("nan"))
    tl.phases = [("before kill", 0.0, t_kill), ("after kill", t_kill, tl.t[-1] if tl.t else t_kill)]
    report.update(fault_summary(results, t_kill, args.deadline_s))
    report.update({"killed": kill.get("victim"), "kill_at_s": round(t_kill, 3),
                   "replacement_running_after_s": kill.get("replaced_after_s"),
                   "ok_throughput": stream_summary([r for r in results if r.code == "OK"], args.duration_s),
                   "timeline": {"t": tl.t, "replicas": tl.replicas, "wanted": tl.wanted, "in_flight": tl.in_flight}})
    report["png"] = str(plot_timeline(tl, figure_path(args.out, "fault_bench.png"),
                                      "herd bench fault: one of 2 replicas killed under load"))
    log(f"fault: {report['failed']} failed {report['errors']} ({report['failed_before_first_token']} before "
        f"their first token), error window {report['error_window_s']} s, "
        f"replacement RUNNING after {report['replacement_running_after_s']} s")
    write_report(report, args.out, "fault_bench.json")
    return 0


def _common(p) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder instead of the demo")
    p.add_argument("--shape", default="llama32-1b-mini", help="demo checkpoint shape (written to a temp folder)")
    p.add_argument("--streams", type=positive_int, default=16, help="concurrent streams")
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--max-num-seqs", type=positive_int, default=32)
    p.add_argument("--replica-cpus", type=positive_float, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--out", default=None, help="folder for the JSON and PNG (default: JSON to stdout)")


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("soak", help="steady mixed load (cancels, invalid input, deadlines): replica RSS and "
                                          "free KV blocks before, during and after (JSON + PNG)")
    _common(p)
    p.add_argument("--minutes", type=positive_float, default=10.0)
    p.add_argument("--max-prompt", type=int_at_least(8), default=256, help="prompts are 8..this many tokens")
    p.add_argument("--cancel-fraction", type=fraction, default=0.15)
    p.add_argument("--invalid-fraction", type=fraction, default=0.1)
    p.add_argument("--deadline-fraction", type=fraction, default=0.1)
    p.add_argument("--feature-fraction", type=fraction, default=0.3,
                   help="share of the valid requests that use one of the served features (JSON schema, regex, "
                        "choice, n > 1, logprobs, stop strings, penalties, Chat with a required tool), each "
                        "output checked against its feature's contract")
    p.add_argument("--timeout-s", type=positive_float, default=120.0, help="deadline of the other requests")
    p.add_argument("--sample-s", type=positive_float, default=1.0, help="RSS / KV sampling period")
    p.add_argument("--warmup-s", type=non_negative_float, default=30.0,
                   help="RSS reference is taken this long into the load")
    p.add_argument("--rss-tolerance-mib", type=non_negative_float, default=64.0)
    p.add_argument("--rss-window-s", type=positive_float, default=60.0,
                   help="RSS is compared as the median of the first and of the last this-many seconds after warm-up")
    p.add_argument("--drain-timeout-s", type=positive_float, default=60.0)
    p.set_defaults(func=run_soak)

    p = bench_sub.add_parser("fault", help="2 replicas under load, one killed: failed requests, error window, "
                                           "hangs, time to a RUNNING replacement (JSON + PNG)")
    _common(p)
    p.add_argument("--prompt-tokens", type=positive_int, default=64)
    p.add_argument("--duration-s", type=positive_float, default=30.0)
    p.add_argument("--kill-at-s", type=non_negative_float, default=8.0)
    p.add_argument("--deadline-s", type=positive_float, default=30.0, help="each request's deadline")
    p.add_argument("--recovery-timeout-s", type=positive_float, default=120.0)
    p.set_defaults(func=run_fault)
