"""Routing at scale, by simulation (benchmarks/routing_sim.py): 8 replicas x 10^5 cached blocks each.

Bounds: report bytes exactly (fixed by construction: the Bloom filter's size depends on the KV capacity, not on
how many blocks are cached); router time per decision only loosely (printed; a loaded 2-core CI machine must
pass); hit rate within 2 points of exact knowledge delivered by the same reports, and near the exact oracle.
"""
from __future__ import annotations

import pickle

from benchmarks.routing_sim import SimCache, Workload, make_report, simulate
from workers.block_hash import filter_shape

REPLICAS, BLOCKS = 8, 100_000


def test_eight_replicas_of_1e5_blocks_report_bytes_router_time_and_hit_rate():
    workload = Workload(requests=1500, seed=3)
    runs = {d: simulate(d, blocks=BLOCKS, replicas=REPLICAS, routers=4, workload=workload, seed=3)
            for d in ("oracle", "filter", "exact-report")}
    for r in runs.values():
        print(r)
    f = runs["filter"]
    num_bits, k = filter_shape(BLOCKS)
    # Bytes: the filter is num_bits / 8 bytes whatever the cache holds, plus a few plain fields.
    assert num_bits // 8 < f["report_bytes"] <= num_bits // 8 + 512
    assert f["report_bytes"] < runs["exact-report"]["report_bytes"] / 8
    # Router state per replica: the filter plus the bounded routed history.
    assert f["router_state_bytes_per_replica"] <= num_bits // 8 + 100 * 16384
    # Time per decision (8 replicas, ~280-block prompts): printed above; loose bound only.
    assert f["router_us_per_decision"]["p50"] < 20_000
    # Hit rate: the filter's false positives cost < 2 points against exact reports, and it stays near the
    # oracle that knows every cache exactly and at once (the rest is report staleness across 4 routers).
    assert abs(f["hit_rate"] - runs["exact-report"]["hit_rate"]) <= 0.02, runs
    assert f["hit_rate"] >= runs["oracle"]["hit_rate"] - 0.04, runs


def test_report_size_does_not_grow_with_the_cached_blocks():
    import numpy as np
    rng = np.random.default_rng(0)
    small, full = SimCache(BLOCKS, rng, with_filter=True), SimCache(BLOCKS, rng, with_filter=True)
    small.lru.clear()                             # an empty cache of the same capacity
    reports = [make_report("filter", c) for c in (small, full)]
    assert len(reports[0]["filter"]) == len(reports[1]["filter"]) == filter_shape(BLOCKS)[0] // 8
    sizes = [len(pickle.dumps(r, protocol=5)) for r in reports]
    assert abs(sizes[0] - sizes[1]) <= 16, sizes   # only the counts' int encodings differ


def test_a_single_router_matches_the_oracle():
    """With one router its routed history covers the reports' staleness: only the filter's error is left."""
    workload = Workload(requests=800, seed=5)
    oracle = simulate("oracle", blocks=20_000, replicas=REPLICAS, routers=1, workload=workload, seed=5)
    compact = simulate("filter", blocks=20_000, replicas=REPLICAS, routers=1, workload=workload, seed=5)
    print(oracle["hit_rate"], compact["hit_rate"])
    assert abs(compact["hit_rate"] - oracle["hit_rate"]) <= 0.02
