"""PrefixCacheRouter: scoring, load guard, report-driven knowledge, optimistic memory and its bounds.

Unit tests drive the real router class (Serve's RequestRouter base included) with replica stand-ins that
have what the router reads: replica_id, max_ongoing_requests, routing_stats and get_queue_len.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID
from ray.serve._private.request_router.common import PendingRequest

from cluster.routing import DEFAULT_REPORT_MAX_HASHES, PrefixCacheRouter, routing_stats
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
@dataclass
class FakeStats:
    num_running: int = 3
    num_waiting: int = 2
    kv_blocks_total: int = 64
    kv_blocks_free: int = 10
    prefix_cache_hit_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class FakeEngine:
    block_size = 16

    def __init__(self, hashes):
        self._hashes = hashes

    def stats(self):
        return FakeStats()

    def cached_block_hashes(self):
        return list(self._hashes)


def test_routing_stats_report_is_newest_first_capped_with_load():
    engine = FakeEngine(list(range(10)))  # engine order: oldest first
    report = routing_stats(engine, max_hashes=4)
    assert report["hashes"] == [9, 8, 7, 6]
    assert report["num_cached_blocks"] == 10
    assert report["block_size"] == 16
    assert (report["num_running"], report["num_waiting"]) == (3, 2)
    assert (report["kv_blocks_total"], report["kv_blocks_free"]) == (64, 10)
    assert routing_stats(FakeEngine([]))["hashes"] == []
    assert len(routing_stats(FakeEngine(list(range(DEFAULT_REPORT_MAX_HASHES + 5))))["hashes"]) \
        == DEFAULT_REPORT_MAX_HASHES


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
        # A report arriving well after the routing is authoritative: A no longer holds CONV_A.
        clock.t += 10
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
    with pytest.raises(TypeError):
        make_router(imbalance=3)   # a typo in request_router_kwargs fails loudly
