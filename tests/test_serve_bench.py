"""`herd bench serve` building blocks that need no cluster: the session workload, the figures, the plot, and the
CLI wiring. (The bench itself runs against a real cluster; see benchmarks/serve_bench.py.)"""
from __future__ import annotations

import argparse
import random
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
    assert s["followups_cold"] == 0 and s["followups_cold_by_turn"] == {}   # one fake replica holds everything
    assert s["requests_per_s"] == round((12 - s["failed"]) / wall, 3)


def test_cold_followups_are_counted_by_turn():
    def turn(t, prompt, cached):
        return sb.TurnResult(session=0, turn=t, ttft_s=0.01, prompt_tokens=prompt, cached_tokens=cached)

    results = [turn(0, 100, 0), turn(1, 120, 100), turn(2, 140, 60), turn(3, 160, 79), turn(3, 160, 80),
               sb.TurnResult(session=1, turn=2, error="UNAVAILABLE")]
    s = sb.summarize(results, 1.0)
    assert s["followups_cold"] == 2 and s["followups_cold_by_turn"] == {"2": 1, "3": 1}


def expected_prompts(w, vocab):
    """Every session's prompts as the workload defines them: the shared system prompt, the session's own
    document (drawn first from the session's generator), then each turn's question; FakeTarget replies 7s."""
    rng = random.Random(w.seed)
    system = [rng.randrange(3, vocab) for _ in range(w.system_tokens)]
    out = {}
    for s in range(w.sessions):
        r = random.Random(w.seed * 1000 + s)
        document = [r.randrange(3, vocab) for _ in range(w.session_tokens)]
        prompt = system + document + [r.randrange(3, vocab) for _ in range(w.user_tokens)]
        out[s] = [prompt]
        for _ in range(w.turns - 1):
            prompt = prompt + [7] * w.max_tokens + [r.randrange(3, vocab) for _ in range(w.user_tokens)]
            out[s].append(prompt)
    return out


def test_session_documents_are_unique_and_every_turn_starts_with_its_own():
    w = sb.Workload(sessions=4, turns=3, system_tokens=12, session_tokens=60, user_tokens=5, max_tokens=2,
                    think_s=0.0)
    target = FakeTarget()
    results, _ = sb.run_sessions(target.generate, w, vocab=500)
    assert len(results) == 12 and len(target.seen) == 12
    system = target.seen[0][:12]
    assert all(p[:12] == system for p in target.seen)            # the system prompt is shared
    by_document = {}
    for p in target.seen:
        by_document.setdefault(tuple(p[12:72]), []).append(p)
    assert len(by_document) == 4                                  # one document per session ...
    assert all(len(prompts) == 3 for prompts in by_document.values())   # ... in every turn of that session
    firsts = [min(prompts, key=len) for prompts in by_document.values()]
    assert all(len(p) == 12 + 60 + 5 for p in firsts)
    # Documents differ from the first token on: two sessions share only the system prompt.
    assert max(FakeTarget._common(a, b) for a in firsts for b in firsts if a is not b) == 12
    # Each turn's prompt is the previous one + the reply + a new question (the document stays a prefix).
    for prompts in by_document.values():
        prompts.sort(key=len)
        assert all(b[:len(a)] == a and len(b) == len(a) + 2 + 5 for a, b in zip(prompts, prompts[1:]))
    # Exactly the prompts the workload defines, and the longest one fits what max_model_len is sized from.
    expected = expected_prompts(w, 500)
    assert sorted(map(tuple, target.seen)) == sorted(tuple(p) for ps in expected.values() for p in ps)
    assert max(len(p) for p in target.seen) + w.max_tokens == w.longest_request()
    # The fake replica caches what it saw: follow-ups hit the document, first turns only the system prompt.
    assert {r.cached_tokens for r in results if r.turn == 0} <= {0, 12}
    assert all(r.cached_tokens >= 12 + 60 for r in results if r.turn > 0)


def test_no_session_tokens_gives_the_old_prompts():
    """session_tokens=0 (the default) draws no document: the prompts of the workload before the option."""
    w = sb.Workload(sessions=3, turns=3, system_tokens=20, user_tokens=6, max_tokens=3, seed=5, think_s=0.0)
    assert w.session_tokens == 0
    target = FakeTarget()
    sb.run_sessions(target.generate, w, vocab=500)
    # The old construction, written out: system prompt from Random(seed), questions from Random(seed*1000+s).
    rng = random.Random(5)
    system = [rng.randrange(3, 500) for _ in range(20)]
    old = []
    for s in range(3):
        r = random.Random(5000 + s)
        prompt = system + [r.randrange(3, 500) for _ in range(6)]
        old.append(prompt)
        for _ in range(2):
            prompt = prompt + [7] * 3 + [r.randrange(3, 500) for _ in range(6)]
            old.append(prompt)
    assert sorted(map(tuple, target.seen)) == sorted(map(tuple, old))
    # With a document the same seed gives other prompts (the document comes first from the session's draws).
    target2 = FakeTarget()
    sb.run_sessions(target2.generate, sb.Workload(sessions=3, turns=3, system_tokens=20, session_tokens=30,
                                                 user_tokens=6, max_tokens=3, seed=5, think_s=0.0), vocab=500)
    assert all(len(p) == len(q) + 30 for p, q in zip(sorted(target2.seen, key=len), sorted(old, key=len)))
    assert not set(map(tuple, target2.seen)) & set(map(tuple, old))


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
    assert args.session_tokens == 0 and sb._workload(args).session_tokens == 0
    args = parser.parse_args(["serve", "--session-tokens", "3072", "--system-tokens", "64", "--turns", "6"])
    w = sb._workload(args)
    assert (w.session_tokens, w.system_tokens, w.turns) == (3072, 64, 6)
    assert w.longest_request() == 64 + 3072 + 6 * args.user_tokens + 6 * args.max_tokens


def test_kv_blocks_bound_the_compared_replicas_cache_only():
    parser = argparse.ArgumentParser()
    sb.register_bench(parser.add_subparsers(dest="scenario", required=True))
    assert parser.parse_args(["serve"]).kv_blocks is None
    assert parser.parse_args(["serve", "--kv-blocks", "2500"]).kv_blocks == 2500
    capped = sb.bench_config("/ckpt", 1, 2, replicas=2, kv_blocks=2500)["models"][0]
    assert capped["num_gpu_blocks_override"] == 2500 and capped["num_replicas"] == 2
    assert "num_gpu_blocks_override" not in sb.bench_config("/ckpt", 1, 2, replicas=1)["models"][0]
    from cluster.config import ClusterConfig  # the key is one the served config takes
    assert ClusterConfig.from_dict(sb.bench_config("/ckpt", 1, 2, replicas=2, kv_blocks=2500)).models[0] \
        .num_gpu_blocks_override == 2500
