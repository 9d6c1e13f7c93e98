"""PrefixCacheRouter: scoring, load guard, report-driven knowledge, optimistic memory and its bounds.

Unit tests drive the real router class (Serve's RequestRouter base included) with replica stand-ins that
have what the router reads: replica_id, max_ongoing_requests, routing_stats and get_queue_len.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
from ray.serve._private.request_router.common import PendingRequest

from cluster.routing import ROUTING_STATS_VERSION, PrefixCacheRouter, routing_stats
from tests.fakes import engine_stats
from cluster.ray_node_start import init_local_ray
from tests.serve_fixtures import stop_herd_cluster
from workers.block_hash import hash_token_blocks

DEP = DeploymentID(name="llm", app_name="herd")
BS = 4  # block size used by the fake replicas' reports


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeReplica:
    """What the router touches of a RunningReplica."""

    def __init__(self, name: str, max_ongoing_requests: int = 100):
        self.replica_id = ReplicaID(unique_id=name, deployment_id=DEP)
        self.max_ongoing_requests = max_ongoing_requests
        self.routing_stats: dict = {}
        self.queue_len = 0
        self.multiplexed_model_ids: set = set()
        self.node_id = None
        self.availability_zone = None

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return self.queue_len

    def report(self, hashes, *, running=0, waiting=0, total=100, free=100, block_size=BS):
        # A new dict object each time, as a broadcast from the controller delivers.
        self.routing_stats = {"v": 1, "block_size": block_size, "hashes": list(hashes), "num_running": running,
                              "num_waiting": waiting, "kv_blocks_total": total, "kv_blocks_free": free}

    def __repr__(self):
        return f"FakeReplica({self.replica_id.unique_id})"


def make_router(clock=None, **kwargs) -> PrefixCacheRouter:
    router = PrefixCacheRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN,
                               use_replica_queue_len_cache=True, get_curr_time_s=clock or Clock())
    router.initialize_state(**{"block_size": BS, **kwargs})
    return router


def request(tokens) -> PendingRequest:
    return PendingRequest(args=[list(tokens)], kwargs={}, metadata=None)  # metadata unused by the router


def blocks(tokens, n=None):
    return hash_token_blocks(list(tokens), BS, limit=n)


def names(ranks):
    return [[r.replica_id.unique_id for r in group] for group in ranks]


def run(coro):
    return asyncio.run(coro)


SYSTEM = list(range(1000, 1016))            # 4 blocks shared by everyone
CONV_A = SYSTEM + list(range(1, 17))        # 8 blocks
CONV_B = SYSTEM + list(range(101, 117))     # 8 blocks, diverges from A after the system prompt


# ---- routing_stats ----------------------------------------------------------------------------------------
class FakeEngine:
    block_size = 16

    def __init__(self, hashes):
        self._hashes = hashes

    def stats(self):
        return engine_stats(num_running=3, num_waiting=2, kv_blocks_total=64, kv_blocks_free=10)

    def cached_block_hashes(self):
        return list(self._hashes)


def test_routing_stats_report_is_a_filter_of_every_cached_block_with_load():
    from workers.block_hash import filter_contains, filter_shape
    engine = FakeEngine(list(range(10)))  # engine order: most recently used first
    report = routing_stats(engine)
    assert report["v"] == ROUTING_STATS_VERSION == 2
    assert "hashes" not in report                               # the filter alone by default
    assert len(report["filter"]) * 8 == filter_shape(64)[0]     # sized for the KV capacity (64 blocks)
    assert all(filter_contains(report["filter"], report["filter_k"], h) for h in range(10))
    assert report["num_cached_blocks"] == 10
    assert report["block_size"] == 16
    assert (report["num_running"], report["num_waiting"]) == (3, 2)
    assert (report["kv_blocks_total"], report["kv_blocks_free"]) == (64, 10)
    assert routing_stats(engine, max_hashes=4)["hashes"] == [0, 1, 2, 3]   # the most recently used, exact
    assert routing_stats(FakeEngine([]))["num_cached_blocks"] == 0
    # The report's size does not depend on how many blocks are cached.
    assert len(routing_stats(FakeEngine(list(range(60))))["filter"]) == len(report["filter"])


# ---- scoring ------------------------------------------------------------------------------------------------
def test_no_knowledge_falls_back_to_power_of_two():
    async def go():
        router = make_router()
        reps = [FakeReplica(n) for n in "abc"]
        router.update_replicas(reps)
        ranks = await router.choose_replicas(reps, request(CONV_A))
        assert len(ranks[0]) == 2 and len(ranks[1]) == 1
        assert {r.replica_id for g in ranks for r in g} == {r.replica_id for r in reps}
        # Two replicas: one rank holding both, in random order.
        two = reps[:2]
        router.update_replicas(two)
        assert sorted(names(await router.choose_replicas(two, request(CONV_A)))[0]) == ["a", "b"]
    run(go())


def test_reported_prefix_wins_and_longest_match_is_preferred():
    async def go():
        router = make_router()
        a, b, c = (FakeReplica(n) for n in "abc")
        a.report(blocks(SYSTEM))                   # 4 blocks of CONV_A's prefix
        b.report(blocks(CONV_A[:24]))              # 6 blocks
        c.report(blocks(CONV_B))                   # shares only the system prompt
        router.update_replicas([a, b, c])
        ranks = await router.choose_replicas([a, b, c], request(CONV_A + [7, 7, 7]))
        assert names(ranks)[0] == ["b"]
        assert set(names(ranks)[1]) == {"a", "c"}
        assert router.match_blocks(a, blocks(CONV_A)) == 4
        assert router.match_blocks(b, blocks(CONV_A)) == 6
        assert router.match_blocks(c, blocks(CONV_A)) == 4
    run(go())


def test_ties_go_to_the_shorter_queue():
    async def go():
        router = make_router()
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(SYSTEM))
        b.report(blocks(SYSTEM))
        router.update_replicas([a, b])
        router.replica_queue_len_cache.update(a.replica_id, 3)
        router.replica_queue_len_cache.update(b.replica_id, 1)
        for _ in range(5):
            assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["b"]
    run(go())


def test_match_counts_the_deepest_block_held_even_if_a_capped_report_lost_the_head():
    async def go():
        router = make_router()
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(CONV_A)[2:])               # head blocks fell out of the capped report
        b.report(blocks(SYSTEM))
        router.update_replicas([a, b])
        assert router.match_blocks(a, blocks(CONV_A)) == 8
        assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["a"]
    run(go())


def test_block_size_comes_from_the_report():
    async def go():
        router = make_router(block_size=16)        # the router's default differs from the replicas'
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(hash_token_blocks(CONV_A, 2), block_size=2)
        b.report([], block_size=2)
        router.update_replicas([a, b])
        assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["a"]
    run(go())


def test_short_prompt_or_non_token_arguments_use_power_of_two():
    async def go():
        router = make_router()
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(SYSTEM))
        router.update_replicas([a, b])
        assert len((await router.choose_replicas([a, b], request([1, 2])))[0]) == 2   # < one full block
        odd = PendingRequest(args=["text prompt"], kwargs={}, metadata=None)
        assert len((await router.choose_replicas([a, b], odd))[0]) == 2
        assert len((await router.choose_replicas([a, b], None))[0]) == 2
        assert await router.choose_replicas([], request(CONV_A)) == []
    run(go())


def test_min_match_blocks_ignores_short_matches():
    async def go():
        router = make_router(min_match_blocks=5)
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(SYSTEM))                   # 4 < 5 blocks
        router.update_replicas([a, b])
        assert len((await router.choose_replicas([a, b], request(CONV_A)))[0]) == 2
    run(go())


# ---- load guard ---------------------------------------------------------------------------------------------
def test_load_guard_sends_to_least_loaded_past_the_margin():
    async def go():
        router = make_router(load_imbalance_margin=8)
        a, b, c = (FakeReplica(n) for n in "abc")
        a.report(blocks(CONV_A))
        router.update_replicas([a, b, c])
        cache = router.replica_queue_len_cache
        cache.update(a.replica_id, 8)
        cache.update(b.replica_id, 0)
        cache.update(c.replica_id, 3)
        assert names(await router.choose_replicas([a, b, c], request(CONV_A)))[0] == ["a"]  # 8 - 0 = margin
        cache.update(a.replica_id, 9)
        ranks = names(await router.choose_replicas([a, b, c], request(CONV_A)))
        assert ranks[0] == ["b"] and set(ranks[1]) == {"a", "c"}
    run(go())


def test_load_guard_uses_reported_load_without_queue_cache_entries():
    async def go():
        router = make_router(load_imbalance_margin=2)
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(CONV_A), running=4, waiting=3)
        b.report([], running=1, waiting=0)
        router.update_replicas([a, b])
        router.replica_queue_len_cache.invalidate_key(a.replica_id)
        router.replica_queue_len_cache.invalidate_key(b.replica_id)
        assert router.load(a) == 7 and router.load(b) == 1
        assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["b"]
    run(go())


# ---- report-driven updates and optimistic memory ------------------------------------------------------------
def test_new_report_replaces_the_old_one():
    async def go():
        router = make_router()
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(CONV_A))
        router.update_replicas([a, b])
        assert router.match_blocks(a, blocks(CONV_A)) == 8
        a.report(blocks(CONV_B))                   # CONV_A's own blocks were evicted, only the system prompt left
        await router.choose_replicas([a, b], request(CONV_A))  # reports are also picked up while routing
        assert router.match_blocks(a, blocks(CONV_A)) == 4
        b.report(blocks(CONV_A))
        router.update_replicas([a, b])
        assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["b"]
    run(go())


def test_routed_requests_are_remembered_until_a_later_report_supersedes_them():
    async def go():
        clock = Clock()
        router = make_router(clock, optimistic_grace_s=5.0)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        first = request(CONV_A)
        await router.choose_replicas([a, b], first)
        router.on_request_routed(first, a.replica_id, None)
        # The next turn of the conversation follows, with no report yet.
        assert names(await router.choose_replicas([a, b], request(CONV_A + [9] * 8)))[0] == ["a"]

        # A report built before the prefill ran (arrives 1 s later, inside the grace period) keeps the memory.
        clock.t += 1
        a.report([])
        router.update_replicas([a, b])
        assert router.match_blocks(a, blocks(CONV_A)) == 8
        # Well after the routing, but the replica still has sequences waiting: ours may be one of them (a
        # burst of long prompts queues for seconds), so the memory stays.
        clock.t += 10
        a.report(blocks(SYSTEM), waiting=3)
        router.update_replicas([a, b])
        assert router.match_blocks(a, blocks(CONV_A)) == 8
        # A report arriving well after the routing, with nothing waiting, is authoritative: A no longer holds
        # CONV_A.
        clock.t += 1
        a.report(blocks(SYSTEM))
        router.update_replicas([a, b])
        assert router.match_blocks(a, blocks(CONV_A)) == 4
    run(go())


def test_optimistic_entries_expire_after_ttl():
    async def go():
        clock = Clock()
        router = make_router(clock, optimistic_ttl_s=30.0)
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        router.on_request_routed(request(CONV_A), a.replica_id, None)
        clock.t += 29
        assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["a"]
        clock.t += 2
        await router.choose_replicas([a, b], request(CONV_A))
        assert router.view(a.replica_id).optimistic == {}
    run(go())


def test_hash_sets_stay_bounded():
    async def go():
        router = make_router(max_hashes_per_replica=8)
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(list(range(100)))                 # newest first: the router keeps the first 8
        router.update_replicas([a, b])
        assert router.view(a.replica_id).reported == set(range(8))
        for i in range(20):
            router.on_request_routed(request([i] * 16), b.replica_id, None)   # 4 blocks each
        opt = router.view(b.replica_id).optimistic
        assert len(opt) == 8
        assert set(opt) == set(blocks([19] * 16)) | set(blocks([18] * 16))   # the most recent survive
    run(go())


def test_removed_or_dead_replicas_are_forgotten():
    async def go():
        router = make_router()
        a, b, c = (FakeReplica(n) for n in "abc")
        a.report(blocks(CONV_A))
        router.update_replicas([a, b, c])
        router.on_request_routed(request(CONV_B), c.replica_id, None)
        router.update_replicas([b, c])
        assert a.replica_id not in router._views
        router.on_replica_actor_died(c.replica_id)
        assert c.replica_id not in router._views
        assert [r.replica_id for r in router.curr_replicas.values()] == [b.replica_id]
    run(go())


def test_invalid_kwargs_are_rejected():
    with pytest.raises(ValueError):
        make_router(block_size=0)
    with pytest.raises(ValueError):
        make_router(min_match_fraction=1.5)
    with pytest.raises(TypeError):
        make_router(imbalance=3)   # a typo in request_router_kwargs fails loudly


# ---- integration: a real local Ray + Serve ------------------------------------------------------------------
TOY_BLOCK = 4


def _toy_llm():
    """A model deployment without a model: it "caches" the block hashes of every prompt (and its reply) it
    served and reports them through record_routing_stats, like the real deployment does with its engine.
    Defined in a function so Serve pickles it by value (workers cannot import the test module)."""
    from types import SimpleNamespace

    from ray import serve

    @serve.deployment(num_replicas=2, max_ongoing_requests=32, ray_actor_options={"num_cpus": 0},
                      health_check_period_s=1)
    class ToyLLM:
        block_size = TOY_BLOCK

        def __init__(self):
            self.replica = serve.get_replica_context().replica_id.unique_id
            self._hashes: list[int] = []
            self._known: set[int] = set()

        def stats(self):
            return SimpleNamespace(num_running=0, num_waiting=0, kv_blocks_total=4096,
                                   kv_blocks_free=4096 - len(self._hashes))

        def cached_block_hashes(self):
            return self._hashes

        def record_routing_stats(self) -> dict:
            from cluster.routing import routing_stats
            return routing_stats(self)

        async def __call__(self, prompt_token_ids: list[int]) -> dict:
            from workers.block_hash import hash_token_blocks

            reply = [(sum(prompt_token_ids) + i) % 997 for i in range(4)]   # "generated" tokens
            for h in hash_token_blocks(prompt_token_ids + reply, self.block_size):
                if h not in self._known:
                    self._known.add(h)
                    self._hashes.append(h)
            return {"replica": self.replica, "reply": reply}

    return ToyLLM


def _conversations(n_sessions, n_turns, call):
    """Multi-turn sessions, interleaved turn by turn in a shuffled order (Serve's default router alternates
    between two idle replicas, which a fixed order could turn into accidental stickiness); returns the replica
    of every turn per session, and the histories."""
    import random

    order = random.Random(7)
    system = list(range(500, 508))                                          # 2 shared blocks
    history = {s: system + [s * 50 + i for i in range(8)] for s in range(n_sessions)}
    placed = {s: [] for s in range(n_sessions)}
    for turn in range(n_turns):
        sessions = list(range(n_sessions))
        order.shuffle(sessions)
        for s in sessions:
            out = call(history[s])
            placed[s].append(out["replica"])
            history[s] = history[s] + out["reply"] + [s * 50 + 10 + turn * 8 + i for i in range(8)]
    return placed, history


@pytest.mark.slow
def test_sessions_stick_to_the_replica_holding_their_prefix():
    import ray
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    init_local_ray(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                   log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        toy = _toy_llm()
        prefix_app = toy.options(request_router_config=RequestRouterConfig(
            request_router_class="cluster.routing:PrefixCacheRouter",
            request_router_kwargs={"block_size": TOY_BLOCK, "load_imbalance_margin": 8},
            request_routing_stats_period_s=0.5)).bind()
        default_app = toy.options(request_router_config=RequestRouterConfig(
            request_routing_stats_period_s=0.5)).bind()
        prefix = serve.run(prefix_app, name="prefix", route_prefix=None)
        default = serve.run(default_app, name="default", route_prefix=None)

        n_sessions, n_turns = 7, 4
        placed, history = _conversations(n_sessions, n_turns, lambda t: prefix.remote(t).result())
        for s, reps in placed.items():
            assert len(set(reps)) == 1, f"session {s} moved between replicas: {reps}"
        home = {s: reps[0] for s, reps in placed.items()}

        placed_default, _ = _conversations(n_sessions, n_turns, lambda t: default.remote(t).result())
        followups = [(reps[0] == r) for reps in placed_default.values() for r in reps[1:]]
        assert not all(followups), "the default router kept every session on one replica"
        assert len({r for reps in placed_default.values() for r in reps}) == 2

        # A router that never routed these sessions (a new handle in another process) must place the next
        # turn from the replicas' reports alone.
        @ray.remote(num_cpus=0)
        def next_turns(histories):
            from ray import serve as s
            handle = s.get_deployment_handle("ToyLLM", app_name="prefix")
            return {k: handle.remote(v).result()["replica"] for k, v in histories.items()}

        time.sleep(2.0)   # > request_routing_stats_period_s: the last turns are in the reports
        fresh = ray.get(next_turns.remote(history))
        assert fresh == home
    finally:
        stop_herd_cluster()


@pytest.mark.slow
def test_real_engine_sessions_hit_their_prefix_cache(tmp_path):
    """The whole path: gRPC -> ingress -> PrefixCacheRouter -> one of two real engine replicas. Every follow-up
    turn must find the conversation so far in its replica's prefix cache (cached_tokens over gRPC), and the
    replicas' routing reports must carry a filter of the engine's block hashes."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from serve_fixtures import start_herd_cluster, stop_herd_cluster, wait_for

    from benchmarks.serve_bench import GrpcTarget, Workload, run_sessions, summarize
    from workers.demo import write_demo_checkpoint

    ckpt = write_demo_checkpoint(tmp_path / "tiny", "llama32-1b-mini")
    config = {"models": [{"name": "tiny", "path": str(ckpt), "num_replicas": 2,
                          "resources_per_shard": {"CPU": 0.25}, "max_model_len": 1024,
                          "router": {"routing_stats_period_s": 0.5}}]}
    cluster = start_herd_cluster(config, num_cpus=2)
    try:
        target = GrpcTarget(cluster.grpc_address, "tiny")
        info = target.model_info()
        block = info.block_size
        # Short shared system prompt, long turns: a follow-up on the wrong replica would find only the system
        # prompt cached.
        w = Workload(sessions=4, turns=3, system_tokens=block, user_tokens=4 * block, max_tokens=8, seed=3)
        results, wall = run_sessions(lambda p, m: target.generate(p, m), w, info.vocab_size)
        target.close()
        summary = summarize(results, wall)
        assert summary["failed"] == 0, summary
        by_session: dict[int, list] = {}
        for r in results:
            by_session.setdefault(r.session, []).append(r)
        for s, turns in by_session.items():
            turns.sort(key=lambda r: r.turn)
            for prev, cur in zip(turns, turns[1:]):
                # The previous prompt's full blocks at least (its reply may add more).
                assert cur.cached_tokens >= (prev.prompt_tokens // block) * block, (s, prev, cur)
        handle = cluster.model_handle("tiny")
        reports: list[dict] = []

        def a_replica_reports_its_cache() -> bool:
            # Either replica answers a call (the sessions may all have gone to one of them, the other holding
            # nothing), and the engine snapshots its filter between steps: ask until a holder answers.
            reports.append(handle.record_routing_stats.remote().result(timeout_s=30))
            return reports[-1]["num_cached_blocks"] > 0 and any(reports[-1]["filter"])
        wait_for(a_replica_reports_its_cache, timeout_s=60, interval_s=0.2)
        assert all(r["block_size"] == block and r["kv_blocks_total"] > 0 for r in reports)
        assert all(r["v"] == 2 for r in reports)
        held = [r for r in reports if r["num_cached_blocks"] > 0]
        assert all(isinstance(r.get("filter"), bytes) and r["filter_k"] >= 1 for r in held), [sorted(r) for r in held]
    finally:
        stop_herd_cluster()


def test_a_salted_request_only_matches_blocks_hashed_with_its_salt():
    """Per-key cache isolation: the router hashes with the request's cache_salt exactly as the engine does."""
    async def go():
        router = make_router()
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(CONV_A))                                         # the shared (unsalted) cache
        b.report(hash_token_blocks(list(CONV_A), BS, salt=77))           # tenant 77's blocks
        router.update_replicas([a, b])
        salted = PendingRequest(args=[list(CONV_A) + [1]], kwargs={"cache_salt": 77}, metadata=None)
        assert names(await router.choose_replicas([a, b], salted))[0] == ["b"]
        # As the ingress sends it: every argument positional (prompt, sampling, request id, salt, context).
        positional = PendingRequest(args=[list(CONV_A) + [1], {}, "r1", 77, None], kwargs={}, metadata=None)
        assert names(await router.choose_replicas([a, b], positional))[0] == ["b"]
        other = PendingRequest(args=[list(CONV_A) + [1]], kwargs={"cache_salt": 78}, metadata=None)
        hashes = router._request_hashes(other, list(CONV_A), BS)
        assert router.match_blocks(a, hashes) == router.match_blocks(b, hashes) == 0
        assert names(await router.choose_replicas([a, b], request(list(CONV_A) + [1])))[0] == ["a"]
    run(go())


# ---- reports at scale: recency order, the filter, old formats ----------------------------------------------
class KVEngine:
    """An engine stand-in over a real KVCacheManager, with what routing_stats reads of an AsyncEngine."""

    def __init__(self, num_blocks=256, block_size=BS):
        from workers.kv_cache import KVCacheManager
        self.kv = KVCacheManager(num_blocks, block_size)
        self.block_size = block_size
        self._n = 0

    def stats(self):
        return engine_stats(kv_blocks_total=self.kv.num_blocks, kv_blocks_free=self.kv.num_free_blocks)

    def cached_block_hashes(self):
        return self.kv.cached_block_hashes(4096)

    def cached_block_filter(self):
        return self.kv.block_filter()

    def serve(self, tokens):
        """Run one prompt through the cache: reuse its cached prefix, register the rest, finish."""
        self._n += 1
        seq = f"s{self._n}"
        cached = self.kv.find_cached_prefix(tokens)
        assert self.kv.allocate(seq, tokens, len(tokens), cached)
        self.kv.free(seq)


def test_a_hot_prefix_reused_among_many_newer_blocks_survives_a_truncated_or_compact_report():
    hot = list(range(5000, 5032))                   # a system prompt: 8 blocks, registered first
    a = KVEngine(num_blocks=1024)
    a.serve(hot + [1])
    registered_after_hot = 0
    for i in range(60):                             # 60 conversations of 8 new blocks each, all newer than `hot`
        a.serve([10_000 + i * 100 + j for j in range(32)] + [2])
        registered_after_hot += 8
        if i % 10 == 9:
            a.serve(hot + [i, i, i, i, 3])          # the hot prompt is used again: a prefix-cache hit
    a.serve([90_000 + j for j in range(32)] + [4])  # and newer blocks after its last use
    registered_after_hot += 8
    truncated = 64
    assert registered_after_hot > 4 * truncated    # newest-*registered* first, a 64-hash report had lost `hot`

    hot_hashes = blocks(hot)
    recent = routing_stats(a, max_hashes=truncated)["hashes"]
    assert set(hot_hashes) <= set(recent[:16])      # recency order: among the most recently used

    async def go(report):
        router = make_router()
        ra, rb = FakeReplica("a"), FakeReplica("b")
        rb.report(blocks(CONV_B))                   # b holds something else
        ra.routing_stats = report
        router.update_replicas([ra, rb])
        for turn in range(3):
            ranks = names(await router.choose_replicas([ra, rb], request(hot + [turn] * 12)))
            assert ranks[0] == ["a"], ranks
        assert router.match_blocks(ra, hot_hashes) == 8

    full = routing_stats(a, max_hashes=truncated)
    compact = {k: v for k, v in full.items() if k != "hashes"}     # the filter alone
    only_list = {k: v for k, v in full.items() if k not in ("filter", "filter_k")}
    for report in (compact, only_list):
        run(go(report))


def test_a_fresh_router_routes_from_the_first_filter_report():
    """No routing history at all: one report per replica and every conversation goes to its replica."""
    async def go():
        engines = [KVEngine(num_blocks=512) for _ in range(4)]
        convs = {}
        for c in range(40):
            tokens = SYSTEM + [100_000 + c * 64 + j for j in range(24)]
            engines[c % 4].serve(tokens + [0])
            convs[c] = tokens
        for e in engines:
            e.serve(SYSTEM + [7])                   # everyone holds the system prompt
        reps = [FakeReplica(f"r{i}") for i in range(4)]
        for rep, e in zip(reps, engines):
            rep.routing_stats = routing_stats(e)
        router = make_router()
        router.update_replicas(reps)
        for c, tokens in convs.items():
            ranks = names(await router.choose_replicas(reps, request(tokens + [1, 2, 3, 4, 5])))
            assert ranks[0] == [f"r{c % 4}"], (c, ranks)
    run(go())


def test_filter_is_read_as_a_leading_run_so_stray_deep_bits_do_not_match():
    from workers.block_hash import filter_from_hashes, filter_shape

    def filter_report(hashes):
        m, k = filter_shape(256)
        return {"v": 2, "block_size": BS, "filter": filter_from_hashes(hashes, m, k), "filter_k": k,
                "num_running": 0, "num_waiting": 0, "kv_blocks_total": 256, "kv_blocks_free": 256}

    async def go():
        router = make_router()
        a, b = FakeReplica("a"), FakeReplica("b")
        a.routing_stats = filter_report(blocks(CONV_A)[3:])    # deep blocks only (as false positives would look)
        b.routing_stats = filter_report(blocks(CONV_A)[:5])
        router.update_replicas([a, b])
        assert router.match_blocks(a, blocks(CONV_A)) == 0
        assert router.match_blocks(b, blocks(CONV_A)) == 5
        assert names(await router.choose_replicas([a, b], request(CONV_A)))[0] == ["b"]
        # Routed history is exact: it counts by its deepest block, beyond the filter's run.
        router.remember_routed(a.replica_id, blocks(CONV_A))
        assert router.match_blocks(a, blocks(CONV_A)) == 8
    run(go())


def test_old_and_new_report_formats_mix():
    async def go():
        router = make_router()
        old, new = FakeReplica("old"), FakeReplica("new")
        old.report(blocks(CONV_A))                          # format 1: a hash list
        e = KVEngine()
        e.serve(list(CONV_B) + [1])
        new.routing_stats = routing_stats(e)                # format 2: the filter
        router.update_replicas([old, new])
        assert names(await router.choose_replicas([old, new], request(CONV_A + [9])))[0] == ["old"]
        assert names(await router.choose_replicas([old, new], request(CONV_B + [9])))[0] == ["new"]
        # A filter over the router's bound is ignored, not held.
        small = make_router(max_filter_bytes=8)
        small.update_replicas([old, new])
        assert small.view(new.replica_id).filter_bits is None
    run(go())


def test_load_wins_over_affinity_at_the_queue_and_kv_thresholds():
    """Measured: the queue length and the free-KV fraction at which the router leaves the cached replica."""
    async def leaves(margin, queue=0, waiting=0, free=100):
        router = make_router(load_imbalance_margin=margin, kv_saturated_free_fraction=0.05)
        a, b, c = (FakeReplica(n) for n in "abc")
        a.report(blocks(CONV_A), running=0, waiting=waiting, total=100, free=free)
        b.report([])
        c.report([])
        router.update_replicas([a, b, c])
        router.replica_queue_len_cache.update(a.replica_id, queue)
        router.replica_queue_len_cache.update(b.replica_id, 0)
        router.replica_queue_len_cache.update(c.replica_id, 1)
        return names(await router.choose_replicas([a, b, c], request(CONV_A)))[0] != ["a"]

    async def go():
        for margin in (0, 4, 8):
            leave_at = [q for q in range(20) if await leaves(margin, queue=q)][0]
            print(f"margin {margin}: leaves the cached replica at queue {leave_at} (others 0 and 1)")
            assert leave_at == margin + 1
        # KV: saturated (sequences waiting, < 5% blocks free) -> leave; low free KV alone (nothing waiting) stays.
        free_at = [f for f in range(0, 20) if await leaves(8, waiting=2, free=f)]
        print(f"with sequences waiting, leaves at free KV blocks {free_at} of 100")
        assert free_at == [0, 1, 2, 3, 4]
        assert not await leaves(8, waiting=0, free=0)
    run(go())


def test_misses_and_ties_spread_over_the_replicas():
    """Misses (power of two) and ties (a shuffle) spread over all 8 replicas. The router draws from Python's
    `random`, seeded here so the test is the same every run: unseeded, one full `make test` saw the ties at 127
    against 62 (pure chance gives that less than once in 2,000 runs, and no cause was found: over 16,000 tie
    draws each replica got 1,962-2,046)."""
    import random

    state = random.getstate()
    random.seed(20261201)

    async def go():
        from collections import Counter

        router = make_router()
        reps = [FakeReplica(f"r{i}") for i in range(8)]
        for i, rep in enumerate(reps):
            e = KVEngine(num_blocks=512)
            e.serve(SYSTEM + [1])                           # every replica holds the system prompt (ties)
            for j in range(40):                             # and a fairly full cache of other blocks
                e.serve([i * 10_000 + j * 100 + t for t in range(40)] + [2])
            rep.routing_stats = routing_stats(e)
        router.update_replicas(reps)
        misses, ties = Counter(), Counter()
        for n in range(800):
            first = (await router.choose_replicas(reps, request([500_000 + n * 50 + t for t in range(40)])))[0]
            misses.update(r.replica_id.unique_id for r in first)       # Serve takes the shorter queue of the two
            first = (await router.choose_replicas(reps, request(SYSTEM + [600_000 + n] * 8)))[0]
            ties.update(r.replica_id.unique_id for r in first)
        for counts in (misses, ties):
            print(sorted(counts.values()))
            assert len(counts) == 8 and max(counts.values()) < 2 * min(counts.values())
    try:
        run(go())
    finally:
        random.setstate(state)


def test_a_match_covering_little_of_the_prompt_is_placed_by_load():
    """A new session's first prompt (the shared system prompt, then its own document) is not pulled to the
    replica that holds just the system prompt: below min_match_fraction it goes by load (power of two), so a
    burst of new sessions spreads; its follow-ups, mostly cached, keep their affinity."""
    document = list(range(5000, 5000 + 12 * BS))         # 12 blocks of the session's own
    first_turn = SYSTEM + document                        # 4 of 16 blocks held by a: 25%
    follow_up = first_turn + list(range(7000, 7000 + BS))

    async def go(**kwargs):
        router = make_router(**kwargs)
        a, b = FakeReplica("a"), FakeReplica("b")
        a.report(blocks(SYSTEM))
        router.update_replicas([a, b])
        first = names(await router.choose_replicas([a, b], request(first_turn)))
        b.report(blocks(first_turn))                      # the session's first turn ran on b
        router.update_replicas([a, b])
        return first, names(await router.choose_replicas([a, b], request(follow_up)))

    first, follow = run(go())
    assert sorted(first[0]) == ["a", "b"]                 # both candidates: the shorter queue takes it
    assert follow[0] == ["b"]                             # 16 of 17 blocks: affinity
    first, _ = run(go(min_match_fraction=0.0))            # the rule off: the system prompt's holder wins
    assert first[0] == ["a"]
    first, _ = run(go(min_match_fraction=0.25))           # exactly the fraction covered: a match
    assert first[0] == ["a"]
