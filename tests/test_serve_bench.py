"""`herd bench serve` building blocks that need no cluster: the session workload, the figures, the plot, and the
CLI wiring. (The bench itself runs against a real cluster; see benchmarks/serve_bench.py.)"""
from __future__ import annotations

import argparse
import threading
import time

from benchmarks import serve_bench as sb


class FakeTarget:
    """Answers like a replica with a prefix cache: cached tokens = the longest prompt prefix seen before."""

    def __init__(self, fail_every: int = 0):
        self.seen: list[list[int]] = []
        self.calls = 0
        self.fail_every = fail_every
        self.lock = threading.Lock()

    def generate(self, prompt, max_tokens):
        with self.lock:
            self.calls += 1
            n = self.calls
            cached = max((self._common(prompt, p) for p in self.seen), default=0)
            self.seen.append(list(prompt))
        if self.fail_every and n % self.fail_every == 0:
            return sb.TurnResult(session=-1, turn=-1, error="RESOURCE_EXHAUSTED"), []
        time.sleep(0.001)
        return (sb.TurnResult(session=-1, turn=-1, ttft_s=0.01 * (1 + n % 3), latency_s=0.05,
                              prompt_tokens=len(prompt), completion_tokens=max_tokens, cached_tokens=cached),
                [7] * max_tokens)

    @staticmethod
    def _common(a, b):
        k = 0
        for x, y in zip(a, b):
            if x != y:
                break
            k += 1
        return k


def test_percentile_nearest_rank():
    assert sb.percentile([], 50) is None
    assert sb.percentile([3.0], 99) == 3.0
    values = [float(i) for i in range(1, 101)]
    assert sb.percentile(values, 50) == 50.0 and sb.percentile(values, 99) == 99.0


def test_sessions_grow_their_conversation_and_figures_add_up():
    target = FakeTarget(fail_every=7)
    w = sb.Workload(sessions=3, turns=4, system_tokens=20, user_tokens=5, max_tokens=4)
    results, wall = sb.run_sessions(target.generate, w, vocab=500)
    assert len(results) == 12 and {(r.session, r.turn) for r in results} == {(s, t) for s in range(3)
                                                                               for t in range(4)}
    # Every turn's prompt extends the session's previous prompt (+ reply + new question).
    by_session = {}
    for p in target.seen:
        by_session.setdefault(tuple(p[20:25]), []).append(p)
    for prompts in by_session.values():
        prompts.sort(key=len)
        assert all(b[:len(a)] == a for a, b in zip(prompts, prompts[1:]))
    s = sb.summarize(results, wall)
    assert s["requests"] == 12 and s["failed"] == sum(1 for r in results if r.error) == s["errors"]["RESOURCE_EXHAUSTED"]
    assert s["generated_tokens"] == 4 * (12 - s["failed"])
    assert 0 < s["cached_fraction"] < s["cached_fraction_followups"] <= 1
    assert s["ttft_p50_ms"] <= s["ttft_p99_ms"]


def test_timeline_samples_and_plots(tmp_path):
    target = FakeTarget()
    replicas = iter(range(1000))
    tl = sb.autoscale_timeline(target, 500, lambda: (1 + next(replicas) // 4, 2 + next(replicas) // 4),
                               [("low", 0.3, 1), ("high", 0.3, 3), ("idle", 0.2, 0)], period_s=0.05,
                               max_tokens=2)
    assert [p[0] for p in tl.phases] == ["low", "high", "idle"]
    assert len(tl.t) == len(tl.replicas) == len(tl.wanted) == len(tl.in_flight) >= 10
    assert max(tl.replicas) > 1 and target.calls > 0
    png = sb.plot_timeline(tl, tmp_path / "t.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_overhead_summary():
    g = [sb.TurnResult(0, 0, ttft_s=0.020, latency_s=0.100)] * 3
    l = [sb.TurnResult(0, 0, ttft_s=0.005, latency_s=0.080)] * 3
    o = sb.overhead_summary(g, l)
    assert o["overhead_ttft_p50_ms"] == 15.0 and o["overhead_latency_p50_ms"] == 20.0


def test_register_bench_adds_the_serve_scenario():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="scenario", required=True)
    sb.register_bench(sub)
    args = parser.parse_args(["serve", "--sessions", "2", "--address", "127.0.0.1:9000"])
    assert args.func is sb.run and args.sessions == 2 and args.address == "127.0.0.1:9000"
