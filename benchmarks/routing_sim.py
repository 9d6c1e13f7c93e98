"""Routing at scale, simulated: the report path of `cluster.routing` with 10^5-10^6 cached blocks per replica.

No model and no Ray cluster: each replica is an LRU prefix cache of block hashes (refreshed on a hit, like
workers.kv_cache) that keeps the same counting Bloom filter the engine keeps. Requests come from a multi-turn
chat workload (hot system prompts, long sessions, one-off documents). Several real `PrefixCacheRouter`s (as
several ingress replicas would run) route them, round robin, each from the same periodic reports plus its own
routed history; the sim then serves each request on the chosen replica and counts the blocks it found cached.

Report designs compared, on the same workload:

- `oracle`: exact, current knowledge of every cache (the bound; no report at all).
- `filter`: report format 2, a Bloom filter of every cached block (what herd sends).
- `recent-N`: the N most recently used hashes, exact (a truncated report in recency order).
- `registered-N`: the N most recently *registered* hashes (the format-1 report before recency order).
- `exact-report`: every hash, exact (what incremental stored/evicted events would rebuild in each router);
  run only up to `exact_report_max_blocks`, its bytes and router state are given for every size.

Figures per design: bytes per report (pickled, as Serve ships the dict), router CPU per decision
(choose_replicas + on_request_routed), router state per replica, and the prefix hit rate (cached blocks /
prompt blocks) next to the oracle's.

    herd bench routing-sim --blocks 100000 1000000     (or: python -m benchmarks.routing_sim ...)
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import pickle
import random
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from benchmarks.bench_args import non_negative_int, positive_int
from benchmarks.bench_common import report_stream
from workers.block_hash import CountingBlockFilter, filter_positions, filter_shape

if TYPE_CHECKING:      # numpy is imported where the simulation runs: `herd --help` registers this without it
    import numpy as np

BLOCK_SIZE = 16


# ---- the workload ----------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """A chat service's prompts as chains of block hashes (random 64-bit values stand in for chain hashes: a
    prompt's i-th hash stands for its first i+1 blocks)."""

    requests: int = 4000
    system_prompts: int = 16
    system_blocks: tuple = (32, 128)    # per system prompt
    new_session: float = 0.15           # probability a request starts a session (else: a session's next turn)
    active_sessions: int = 2000         # sessions that can get another turn (oldest dropped)
    user_blocks: tuple = (4, 48)        # added by a turn
    reply_blocks: int = 4               # the previous reply, part of the next turn's prompt
    document: float = 0.1               # probability of a one-off document prompt (churn)
    document_blocks: tuple = (128, 512)
    max_prompt_blocks: int = 2048
    seed: int = 0

    def prompts(self):
        rng = random.Random(self.seed)
        bits = rng.getrandbits
        systems = [[bits(64) for _ in range(rng.randint(*self.system_blocks))] for _ in range(self.system_prompts)]
        weights = [1 / (i + 1) for i in range(self.system_prompts)]   # Zipf: a few prompts are very hot
        sessions: OrderedDict[int, list] = OrderedDict()
        next_id = 0
        for _ in range(self.requests):
            if rng.random() < self.document:
                yield [bits(64) for _ in range(rng.randint(*self.document_blocks))]
                continue
            if not sessions or rng.random() < self.new_session:
                history = list(rng.choices(systems, weights)[0])
                sessions[next_id] = history
                next_id += 1
                if len(sessions) > self.active_sessions:
                    sessions.popitem(last=False)
            else:
                history = sessions[rng.choice(list(sessions)) if len(sessions) < 64 else
                                   list(sessions)[rng.randrange(len(sessions))]]
                history.extend(bits(64) for _ in range(self.reply_blocks))
            history.extend(bits(64) for _ in range(rng.randint(*self.user_blocks)))
            if len(history) > self.max_prompt_blocks:
                del history[self.max_prompt_blocks:]
            yield list(history)


# ---- a replica's prefix cache ------------------------------------------------------------------------------------
class SimCache:
    """LRU prefix cache of block hashes, the order and filter workers.kv_cache keeps: a served prompt's blocks
    are used tail first, head last (as a finished sequence releases them), evictions take the least recent."""

    def __init__(self, capacity: int, rng: np.random.Generator, with_filter: bool, with_registered: bool = False):
        import numpy as np

        self.capacity = capacity
        cold = rng.integers(0, 2**63, size=capacity, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.lru: OrderedDict[int, None] = OrderedDict.fromkeys(cold.tolist())   # full of cold blocks
        # registration order (only the registered-N design reads it)
        self.registered: Optional[OrderedDict[int, None]] = OrderedDict.fromkeys(self.lru) if with_registered else None
        self.filter: Optional[CountingBlockFilter] = None
        if with_filter:
            num_bits, k = filter_shape(capacity)
            f = CountingBlockFilter(num_bits, k)
            counts = np.bincount(filter_positions(cold, num_bits, k).ravel().astype(np.int64), minlength=num_bits)
            f.counts[:] = np.minimum(counts, 255).astype(np.uint8).tobytes()
            f.bits[:] = np.packbits(counts > 0, bitorder="little").tobytes()
            f.num_hashes = capacity
            self.filter = f
        self.stored = self.evicted = 0   # since the last report: what an event stream would carry

    def leading_run(self, hashes: list) -> int:
        lru = self.lru
        for i, h in enumerate(hashes):
            if h not in lru:
                return i
        return len(hashes)

    def serve(self, hashes: list) -> None:
        lru, reg, f = self.lru, self.registered, self.filter
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
                continue
            if len(lru) >= self.capacity:
                old, _ = lru.popitem(last=False)
                if reg is not None:
                    del reg[old]
                if f is not None:
                    f.remove(old)
                self.evicted += 1
            lru[h] = None
            if reg is not None:
                reg[h] = None
            if f is not None:
                f.add(h)
            self.stored += 1


# ---- the router side -------------------------------------------------------------------------------------------
def _fake_replica_class():
    from ray.serve._private.common import DeploymentID, ReplicaID

    dep = DeploymentID(name="llm", app_name="sim")

    class SimReplica:
        """What the router reads of a RunningReplica."""

        def __init__(self, name: str):
            self.replica_id = ReplicaID(unique_id=name, deployment_id=dep)
            self.max_ongoing_requests = 1000
            self.routing_stats: dict = {}
            self.multiplexed_model_ids: set = set()
            self.node_id = None
            self.availability_zone = None

        async def get_queue_len(self, *, deadline_s: float) -> int:
            return 0

    return dep, SimReplica


def make_report(design: str, cache: SimCache) -> dict:
    base = {"block_size": BLOCK_SIZE, "num_cached_blocks": len(cache.lru), "num_running": 0, "num_waiting": 0,
            "kv_blocks_total": cache.capacity, "kv_blocks_free": cache.capacity}
    if design == "filter":
        return {"v": 2, **base, "filter": cache.filter.snapshot(), "filter_k": cache.filter.k}
    if design.startswith("recent-"):
        n = int(design.split("-")[1])
        return {"v": 1, **base, "hashes": [h for h, _ in zip(reversed(cache.lru), range(n))]}
    if design.startswith("registered-"):
        n = int(design.split("-")[1])
        return {"v": 1, **base, "hashes": [h for h, _ in zip(reversed(cache.registered), range(n))]}
    if design == "exact-report":
        return {"v": 1, **base, "hashes": list(reversed(cache.lru))}
    raise ValueError(design)


def _choose(router, replicas, request) -> list:
    coro = router.choose_replicas(replicas, request)   # never awaits: drive it without an event loop
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("choose_replicas awaited")


def simulate(design: str, **kwargs) -> dict:
    """Route `workload` over `replicas` caches of `blocks` blocks each under one report design. (Inside an
    event loop, which Serve's router base class wants for its queue-length probes; the decisions never await.)"""
    async def inside_a_loop():
        return _simulate(design, **kwargs)
    return asyncio.run(inside_a_loop())


def _simulate(design: str, *, blocks: int, replicas: int = 8, routers: int = 4, workload: Workload = None,
             report_every: int = 100, request_interval_s: float = 0.01, seed: int = 0) -> dict:
    from ray.serve._private.common import DeploymentHandleSource
    from ray.serve._private.request_router.common import PendingRequest

    import numpy as np

    from cluster.routing import PrefixCacheRouter

    workload = workload or Workload()
    rng = np.random.default_rng(seed)
    caches = [SimCache(blocks, rng, with_filter=(design == "filter"), with_registered=design.startswith("registered-"))
              for _ in range(replicas)]
    pick = random.Random(seed + 1)
    clock = [1000.0]
    dep, SimReplica = _fake_replica_class()
    reps = [SimReplica(f"r{i}") for i in range(replicas)]
    rtrs = []
    if design != "oracle":
        for _ in range(routers):
            r = PrefixCacheRouter(deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN,
                                  use_replica_queue_len_cache=False, get_curr_time_s=lambda: clock[0])
            r.initialize_state(block_size=BLOCK_SIZE, max_prefix_blocks=workload.max_prompt_blocks,
                               **({"max_hashes_per_replica": blocks} if design == "exact-report" else {}))
            rtrs.append(r)

    report_bytes: list[int] = []
    event_bytes: list[int] = []

    def publish():
        for rep, cache in zip(reps, caches):
            event_bytes.append(8 * (cache.stored + cache.evicted))
            cache.stored = cache.evicted = 0
            if design != "oracle":
                rep.routing_stats = make_report(design, cache)
                if len(report_bytes) < 4 * replicas:   # pickling a huge list is slow: a sample is enough
                    report_bytes.append(len(pickle.dumps(rep.routing_stats, protocol=5)))
        for r in rtrs:
            r.update_replicas(reps)

    publish()
    hit = total = 0
    decide_s: list[float] = []
    sizes = []
    gc_was = gc.isenabled()
    gc.disable()   # a collection pass over millions of dict entries would land on some decision's time
    try:
        for n, prompt in enumerate(workload.prompts()):
            if n and n % report_every == 0:
                publish()
            clock[0] += request_interval_s
            if design == "oracle":
                runs = [c.leading_run(prompt) for c in caches]
                best = max(runs)
                chosen = pick.choice([i for i, m in enumerate(runs) if m == best]) if best else \
                    pick.randrange(replicas)
            else:
                router = rtrs[n % routers]
                req = PendingRequest(args=[[0]], kwargs={}, metadata=None)
                req._herd_block_hashes = {BLOCK_SIZE: prompt}   # hashing is O(prompt) anyway; not measured
                t0 = time.perf_counter()
                ranks = _choose(router, reps, req)
                first = ranks[0]
                target = first[0] if len(first) == 1 else pick.choice(first)
                router.on_request_routed(req, target.replica_id, None)
                decide_s.append(time.perf_counter() - t0)
                chosen = reps.index(target)
            cache = caches[chosen]
            hit += cache.leading_run(prompt[:-1] if len(prompt) > 1 else [])   # the last block is always computed
            total += max(0, len(prompt) - 1)
            cache.serve(prompt)
            sizes.append(len(prompt))
    finally:
        if gc_was:
            gc.enable()

    out = {"design": design, "blocks_per_replica": blocks, "replicas": replicas, "routers": routers,
           "requests": workload.requests, "mean_prompt_blocks": round(float(np.mean(sizes)), 1),
           "hit_rate": round(hit / max(1, total), 4)}
    if report_bytes:
        out["report_bytes"] = int(max(report_bytes))
    if decide_s:
        d = np.array(decide_s) * 1e6
        out["router_us_per_decision"] = {"p50": round(float(np.percentile(d, 50)), 1),
                                         "p99": round(float(np.percentile(d, 99)), 1),
                                         "mean": round(float(d.mean()), 1)}
        views = rtrs[0]._views.values()
        out["router_state_bytes_per_replica"] = int(max(v.state_bytes() for v in views))
    if design == "exact-report" or design == "oracle":
        # What stored/evicted events would cost: the churn per report, and a full snapshot for a fresh router.
        out["event_bytes_per_report"] = int(np.mean(event_bytes[replicas:] or [0]))
        out["event_snapshot_bytes"] = 8 * blocks
    return out


def run(blocks_list=(100_000, 1_000_000), *, replicas: int = 8, routers: int = 4, requests: int = 4000,
        designs=("oracle", "filter", "recent-4096", "registered-4096", "exact-report"),
        exact_report_max_blocks: int = 200_000, report_every: int = 100, seed: int = 0,
        out=sys.stdout) -> dict:
    """Every design at every size; prints (and returns) one JSON object."""
    results = {"block_size": BLOCK_SIZE, "runs": []}
    for blocks in blocks_list:
        m, k = filter_shape(blocks)
        results.setdefault("filter_shape", {})[str(blocks)] = {"bytes": m // 8, "k": k}
        for design in designs:
            if design == "exact-report" and blocks > exact_report_max_blocks:
                continue
            t0 = time.perf_counter()
            r = simulate(design, blocks=blocks, replicas=replicas, routers=routers, seed=seed,
                         workload=Workload(requests=requests, seed=seed), report_every=report_every)
            r["sim_s"] = round(time.perf_counter() - t0, 1)
            results["runs"].append(r)
            if out is not None:
                print(json.dumps(r), file=sys.stderr, flush=True)
            gc.collect()
    if out is not None:
        print(json.dumps(results, indent=1), file=out)
    return results


def _main(args) -> int:
    run(tuple(args.blocks), replicas=args.replicas, routers=args.routers, requests=args.requests,
        designs=tuple(args.designs), report_every=args.report_every, seed=args.seed, out=report_stream())
    return 0


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=positive_int, nargs="+", default=[100_000, 1_000_000],
                   help="cached blocks per replica")
    p.add_argument("--replicas", type=positive_int, default=8)
    p.add_argument("--routers", type=positive_int, default=4, help="routers (ingress replicas) sharing the reports")
    p.add_argument("--requests", type=positive_int, default=4000)
    p.add_argument("--report-every", type=positive_int, default=100,
                   help="requests between reports (a request every 10 ms of simulated time: 100 = a 1 s period)")
    p.add_argument("--designs", nargs="+",
                   default=["oracle", "filter", "recent-4096", "registered-4096", "exact-report"])
    p.add_argument("--seed", type=non_negative_int, default=0)


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("routing-sim", help="router report designs at 10^5-10^6 cached blocks per replica, "
                                                 "simulated: report bytes, router us per decision, hit rate (JSON)")
    _add_args(p)
    p.set_defaults(func=_main)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _add_args(parser)
    sys.exit(_main(parser.parse_args()))
