"""Prefix-cache-aware request routing for herd's model deployments (a Ray Serve `RequestRouter`).

The router sends a request to the replica whose KV cache already holds the longest prefix of its prompt, so
the replica skips that part of the prefill. It compares *token-block chain hashes*, the very hashes the
engine's prefix cache keys its blocks by (`workers.block_hash.hash_token_blocks`), so "what is cached where"
is the engines' own view rather than a guess over characters.

Where the router's knowledge comes from
---------------------------------------
1. Replica reports. Every `request_routing_stats_period_s` Serve calls the deployment's
   `record_routing_stats()`, which returns `routing_stats(engine)` (below): a Bloom filter of *every* block
   hash the engine's prefix cache holds (its size fixed by the KV capacity, not by how much is cached; the
   engine keeps it up to date block by block) plus load numbers. Serve's controller broadcasts the dict to
   every router, where it appears as `RunningReplica.routing_stats`. A new report *replaces* what the router
   knew of that replica, so evictions reach the router too, and a router that just started knows every
   cache from the first report. (Format 1 reports, a capped list of hashes, are still read.)
2. Optimistic memory. Between reports the router remembers the block hashes of the requests it routed
   itself (the replica will have them cached once the prefill runs). An entry lives until a report that
   arrived at least `optimistic_grace_s` after it was routed supersedes it, or `optimistic_ttl_s` passes.

State per replica is bounded: the filter by `max_filter_bytes`, hash lists by `max_hashes_per_replica`
(reported: the first hashes of a list report; optimistic: least-recently-routed entries are dropped first).

The decision, per request (token ids = the request's first positional argument)
-------------------------------------------------------------------------------
- Replicas the ingress just found unavailable (a broken stream, or an answer that the engine is down) are
  left out, unless that leaves none (`cluster.unavailable_replicas`: Serve's router learns of neither in time).
- Score each candidate by the number of leading full blocks of the prompt it is known to hold, O(prompt
  blocks) whatever the cache size: the leading run of blocks its filter holds (a false positive can only
  lengthen a run now and then), or, from exact knowledge (routed history, list reports), the deepest block
  it holds, since a block's chain hash stands for its whole prefix.
- No replica holds at least `min_match_blocks` blocks, or the best match covers less than `min_match_fraction`
  of the prompt (SGLang's cache-aware router's `cache_threshold`): power of two choices, as Serve's default
  router does (two random candidates; Serve takes the one with the shorter queue). A new session whose prompt
  shares only a system prompt with earlier traffic (its own document behind it) is then placed by load, not
  piled onto whichever replica first cached the system prompt — where its later turns would find that
  replica's queue past the margin and go elsewhere cold.
- Otherwise the best-matching replica (ties: shorter queue, then more free KV blocks) — unless its queue is
  longer than the least loaded candidate's by more than `load_imbalance_margin` requests, in which case the
  least loaded one(s) get it: a hot prefix must not pile every request onto one replica. Likewise when its
  last report shows it KV-saturated (sequences waiting, < `kv_saturated_free_fraction` blocks free).
  Queue length = Serve's per-router queue-length cache (requests sent and not finished, corrected by probes)
  when it has an entry, else the replica's last report (running + waiting sequences).
- Later ranks hold the remaining candidates, so a full replica (at max_ongoing_requests) does not stall the
  request.

Configuration (`request_router_config.request_router_kwargs`): see `PrefixCacheRouter.initialize_state`.
The deployment's `request_router_config.request_routing_stats_period_s` sets how fresh the reports are
(Serve's default is 10 s; 1-2 s suits LLM serving).

Unlike Serve's `FIFOMixin` routers this one does not hand a chosen replica to whichever request is first in
line: the replica chosen for a prompt's prefix serves that prompt.
"""
from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, NotRequired, Optional, Sequence, TypedDict

import numpy as np
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from cluster import tracing
from cluster.metrics import RouterMetrics
from cluster.unavailable_replicas import DEFAULT_TTL_S as DEFAULT_UNAVAILABLE_TTL_S
from cluster.unavailable_replicas import MAX_TTL_S as MAX_UNAVAILABLE_TTL_S
from cluster.unavailable_replicas import without_unavailable
from workers.block_hash import (filter_from_hashes, filter_hits, filter_positions, filter_probe, filter_shape,
                                hash_token_blocks)

logger = logging.getLogger(f"herd.{__name__}")

# Report format 2: a Bloom filter of every block the replica's prefix cache holds ("filter": bytes, "filter_k"),
# whose size is fixed by the replica's KV capacity and capped (workers.block_hash.DEFAULT_FILTER_MAX_BYTES), so
# it does not grow with the number of cached blocks and a router knows the whole cache from one report.
# Optionally the most recently used hashes too ("hashes", exact, most recent first), which routers of format 1
# read. Format 1 ("hashes" only, newest first, capped) is still understood.
ROUTING_STATS_VERSION = 2
DEFAULT_REPORT_MAX_HASHES = 0      # exact hashes sent beside the filter (0: the filter alone)
# A router ignores a replica's filter larger than this (its state per replica stays bounded).
DEFAULT_MAX_FILTER_BYTES = 4 << 20


class RoutingReport(TypedDict):
    """A replica's routing report (format 2): what `record_routing_stats()` returns and the router reads as
    `RunningReplica.routing_stats`. A dict, as Serve requires; a router also reads format 1 (`hashes` only)."""
    v: int                        # ROUTING_STATS_VERSION
    block_size: int
    num_cached_blocks: int
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    at: float                     # when it was built (wall clock): the router's report-age metric
    filter: NotRequired[bytes]    # Bloom filter of every cached block (absent when nothing is cached)
    filter_k: NotRequired[int]    # its hash functions
    hashes: NotRequired[list[int]]  # the most recently used block hashes, newest first (max_hashes > 0)


def routing_stats(engine: Any, max_hashes: int = DEFAULT_REPORT_MAX_HASHES) -> RoutingReport:
    """The replica's routing report: what `record_routing_stats()` of a model deployment returns.

    `engine` is an AsyncEngine: `stats()`, `block_size`, `cached_block_filter()` (the engine thread's snapshot
    of its KV cache's Bloom filter: {"bits", "k", "n"}) and `cached_block_hashes()` (most recently used first).
    An engine without `cached_block_filter()` (a small or fake one), or whose filter is not there yet, gets a
    filter built from its hash list, sized for its KV capacity. All of it is a few plain values and one bytes object of a fixed size.
    """
    stats = engine.stats()
    get_filter = getattr(engine, "cached_block_filter", None)
    block_filter = get_filter() if get_filter is not None else None
    hashes: Optional[list] = None
    if block_filter is None:  # no filter kept (or none snapshotted yet): one from the listed hashes
        hashes = list(engine.cached_block_hashes())
        if hashes:  # nothing cached (or prefix caching off): no filter, the router knows nothing is held
            num_bits, k = filter_shape(max(len(hashes), int(stats.kv_blocks_total or 0)))
            block_filter = {"bits": filter_from_hashes(hashes, num_bits, k), "k": k, "n": len(hashes)}
    report = RoutingReport(v=ROUTING_STATS_VERSION, block_size=int(engine.block_size),
                           num_cached_blocks=int(block_filter["n"]) if block_filter else 0,
                           num_running=int(stats.num_running), num_waiting=int(stats.num_waiting),
                           kv_blocks_total=int(stats.kv_blocks_total), kv_blocks_free=int(stats.kv_blocks_free),
                           at=time.time())
    if block_filter is not None:
        report["filter"] = bytes(block_filter["bits"])
        report["filter_k"] = int(block_filter["k"])
    if max_hashes > 0:
        recent = hashes if hashes is not None else engine.cached_block_hashes()
        report["hashes"] = list(recent[:int(max_hashes)])
    return report


def request_token_ids(pending_request: Optional[PendingRequest]) -> Optional[Sequence[int]]:
    """The prompt's token ids: the first positional argument of every routed model request."""
    if pending_request is None or not pending_request.args:
        return None
    first = pending_request.args[0]
    if isinstance(first, (list, tuple)) and first and isinstance(first[0], int):
        return first
    return None


# Where generate_stream(prompt_token_ids, sampling, request_id, cache_salt, context) (cluster.deployment) takes
# the arguments the router reads besides the token ids.
_CACHE_SALT_ARG = (3, "cache_salt")
_CONTEXT_ARG = (4, "context")


def request_argument(pending_request: PendingRequest, where: tuple[int, str], default: Any = None) -> Any:
    """A generate_stream argument by position or keyword: the ingress passes them all positionally (Serve's
    gRPC transport fails streaming calls with keywords), other callers may name them."""
    position, name = where
    args = pending_request.args or ()
    if len(args) > position:
        return args[position]
    return (pending_request.kwargs or {}).get(name, default)


def request_cache_salt(pending_request: Optional[PendingRequest]) -> int:
    """The request's prefix-cache salt (`cache_salt`; 0 = the shared cache): the router hashes the prompt
    exactly as the engine will, so a tenant's request only ever matches its own tenant's blocks."""
    if pending_request is None:
        return 0
    salt = request_argument(pending_request, _CACHE_SALT_ARG, 0)
    return int(salt) if isinstance(salt, int) else 0


def replica_actor_id(replica: RunningReplica) -> Optional[str]:
    """The replica's actor id in hex, as Ray's actor errors name it."""
    actor_id = getattr(replica, "actor_id", None)
    return actor_id.hex() if actor_id is not None else None


@dataclass
class ReplicaView:
    """What the router knows about one replica's prefix cache and load."""

    reported: set = field(default_factory=set)              # exact hashes from the latest report
    filter_bits: Optional[bytes] = None                     # Bloom filter of the replica's cache (latest report)
    filter_k: int = 0
    optimistic: "OrderedDict[int, float]" = field(default_factory=OrderedDict)  # hash -> routed at (oldest first)
    report: Optional[dict] = None                           # the report object ingested last (identity = new)
    report_at: Optional[float] = None                       # wall-clock time the report was built (or ingested)
    block_size: Optional[int] = None
    num_running: Optional[int] = None
    num_waiting: Optional[int] = None
    kv_blocks_total: Optional[int] = None
    kv_blocks_free: Optional[int] = None

    def holds(self, block_hash: int) -> bool:
        """Exactly known to be held (reported hash list or routed here); the filter is asked separately."""
        return block_hash in self.reported or block_hash in self.optimistic

    def size(self) -> int:
        return len(self.reported) + len(self.optimistic)

    def state_bytes(self) -> int:
        """Rough memory held for this replica: the filter plus ~100 bytes per exact hash."""
        return len(self.filter_bits or b"") + 100 * self.size()


class PrefixCacheRouter(RequestRouter):
    """Routes a request to the replica holding the longest prefix of its token blocks, with a load guard."""

    def initialize_state(
        self,
        block_size: int = 16,
        load_imbalance_margin: float = 8,
        min_match_blocks: int = 1,
        min_match_fraction: float = 0.5,
        max_hashes_per_replica: int = 16384,
        max_prefix_blocks: int = 2048,
        optimistic_grace_s: float = 5.0,
        optimistic_ttl_s: float = 120.0,
        kv_saturated_free_fraction: float = 0.05,
        max_filter_bytes: int = DEFAULT_MAX_FILTER_BYTES,
        unavailable_ttl_s: float = DEFAULT_UNAVAILABLE_TTL_S,
    ):
        """Called by Serve with `request_router_kwargs`.

        block_size: tokens per KV block, used until a replica's report says otherwise (reports win).
        load_imbalance_margin: how many more queued/running requests the best-matching replica may have than
            the least loaded candidate before the request goes to the least loaded one instead.
        min_match_blocks: a replica must hold at least this many leading blocks to count as a match.
        min_match_fraction: ... and they must cover at least this fraction of the prompt (of its hashed part);
            below it the request is placed by load (0 turns the rule off).
        max_hashes_per_replica: bound on the reported set and on the optimistic set of each replica.
        max_prefix_blocks: at most this many leading blocks of a prompt are hashed and compared.
        optimistic_grace_s: a report supersedes routed-but-unreported hashes only if it arrived this long
            after they were routed (the prefill may not have run when the replica built its report), and
            only a report without waiting sequences (one with a queue may not have reached them).
        optimistic_ttl_s: routed-but-unreported hashes are forgotten after this long in any case.
        kv_saturated_free_fraction: a replica whose last report shows waiting sequences and less than this
            fraction of its KV blocks free is saturated: it loses its affinity to the least loaded replica
            that is not (0 turns the rule off).
        max_filter_bytes: a report's Bloom filter larger than this is ignored (bounds the state per replica).
        unavailable_ttl_s: a replica the ingress just found unavailable is left out for this long while others
            remain (cluster.unavailable_replicas; 0 turns the rule off).
        """
        if block_size < 1 or max_hashes_per_replica < 1 or max_prefix_blocks < 1 or min_match_blocks < 1:
            raise ValueError("block_size, max_hashes_per_replica, max_prefix_blocks, min_match_blocks must be >= 1")
        if load_imbalance_margin < 0 or optimistic_grace_s < 0 or optimistic_ttl_s <= 0:
            raise ValueError("load_imbalance_margin and optimistic_grace_s must be >= 0, optimistic_ttl_s > 0")
        if not 0 <= kv_saturated_free_fraction < 1 or max_filter_bytes < 8:
            raise ValueError("kv_saturated_free_fraction must be in [0, 1), max_filter_bytes >= 8")
        if not 0 <= min_match_fraction <= 1:
            raise ValueError("min_match_fraction must be in [0, 1]")
        if not 0 <= unavailable_ttl_s <= MAX_UNAVAILABLE_TTL_S:
            raise ValueError(f"unavailable_ttl_s must be in [0, {MAX_UNAVAILABLE_TTL_S:g}]")
        self._unavailable_ttl_s = float(unavailable_ttl_s)
        self._min_match_fraction = float(min_match_fraction)
        self._kv_saturated = float(kv_saturated_free_fraction)
        self._max_filter_bytes = int(max_filter_bytes)
        self._default_block_size = int(block_size)
        self._margin = float(load_imbalance_margin)
        self._min_match_blocks = int(min_match_blocks)
        self._max_hashes = int(max_hashes_per_replica)
        self._max_prefix_blocks = int(max_prefix_blocks)
        self._grace_s = float(optimistic_grace_s)
        self._ttl_s = float(optimistic_ttl_s)
        self._views: dict[ReplicaID, ReplicaView] = {}
        self._metrics = RouterMetrics(self._model_name())

    def _model_name(self) -> str:
        """The model this router routes for (its deployment is `model-<name>`, cluster.app.deployment_name)."""
        dep = getattr(getattr(self, "_deployment_id", None), "name", None) or "unknown"
        return dep[len("model-"):] if dep.startswith("model-") else dep

    # Defaults for a router Serve built without calling initialize_state (it always calls it today).
    def _state(self) -> dict[ReplicaID, ReplicaView]:
        if not hasattr(self, "_views"):
            PrefixCacheRouter.initialize_state(self)
        return self._views

    def _now(self) -> float:
        return self._get_curr_time_s()

    # ---- knowledge ------------------------------------------------------------------------------------
    def view(self, replica_id: ReplicaID) -> ReplicaView:
        views = self._state()
        v = views.get(replica_id)
        if v is None:
            v = views[replica_id] = ReplicaView()
        return v

    def _ingest_report(self, replica: RunningReplica) -> None:
        """Take in the replica's latest routing report, if it is one the router has not seen."""
        report = replica.routing_stats
        v = self.view(replica.replica_id)
        if report is v.report:
            return
        v.report = report
        if not report or ("hashes" not in report and "v" not in report):
            return  # no report yet (Serve starts with {}), or a deployment without record_routing_stats data
        # Format 1: "hashes" only (newest first); format 2: "filter" (+ "filter_k") and optional "hashes".
        v.reported = set(report.get("hashes", ())[: self._max_hashes])
        bits, k = report.get("filter"), report.get("filter_k")
        if isinstance(bits, (bytes, bytearray)) and isinstance(k, int) and k >= 1 and bits \
                and len(bits) <= self._max_filter_bytes:
            v.filter_bits, v.filter_k = bytes(bits), k
        else:
            if bits and not getattr(self, "_warned_filter_size", False):
                self._warned_filter_size = True   # once: a report arrives every period
                logger.warning("ignoring routing report filters over max_filter_bytes=%d (this one: %d bytes)",
                               self._max_filter_bytes, len(bits))
            v.filter_bits, v.filter_k = None, 0
        at = report.get("at")
        v.report_at = float(at) if isinstance(at, (int, float)) else time.time()
        bs = report.get("block_size")
        v.block_size = int(bs) if bs else None
        for key in ("num_running", "num_waiting", "kv_blocks_total", "kv_blocks_free"):
            value = report.get(key)
            setattr(v, key, int(value) if value is not None else None)
        # Routed blocks old enough to have been prefilled before the replica built this report are now the
        # report's business: it either lists them or they were evicted. Not while the report shows sequences
        # waiting: a request routed there may still be in that queue, its prefill not run (a burst of long
        # prompts queues for seconds), and dropping its blocks now would send its follow-up elsewhere, cold.
        # Then only optimistic_ttl_s bounds them.
        if not v.num_waiting:
            self._expire_optimistic(v, self._now() - self._grace_s)

    def _expire_optimistic(self, v: ReplicaView, before: float) -> None:
        opt = v.optimistic
        while opt:
            oldest_hash, routed_at = next(iter(opt.items()))
            if routed_at >= before:
                break
            opt.popitem(last=False)

    def remember_routed(self, replica_id: ReplicaID, block_hashes: Sequence[int]) -> None:
        """Optimistically record that `replica_id` will hold these blocks (bounded, least recent dropped)."""
        v = self.view(replica_id)
        now, opt = self._now(), v.optimistic
        for h in block_hashes:
            if h in opt:
                opt.move_to_end(h)
            opt[h] = now
        while len(opt) > self._max_hashes:
            opt.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]):
        super().update_replicas(replicas)
        views = self._state()
        live = {r.replica_id for r in replicas}
        for rid in list(views):
            if rid not in live:
                del views[rid]
        for r in replicas:
            self._ingest_report(r)

    def on_replica_actor_died(self, replica_id: ReplicaID):
        super().on_replica_actor_died(replica_id)
        self._state().pop(replica_id, None)

    # ---- scoring ----------------------------------------------------------------------------------------
    def _block_size_for(self, replica_id: ReplicaID) -> int:
        v = self._state().get(replica_id)
        return (v.block_size if v is not None and v.block_size else None) or self._default_block_size

    def _request_hashes(self, pending_request: PendingRequest, token_ids: Sequence[int],
                        block_size: int) -> list[int]:
        """The prompt's block hashes for one block size, computed once per request (routing retries reuse)."""
        cache = getattr(pending_request, "_herd_block_hashes", None)
        if cache is None:
            cache = {}
            try:
                setattr(pending_request, "_herd_block_hashes", cache)
            except AttributeError:  # a request object that takes no attributes: just recompute next time
                pass
        hashes = cache.get(block_size)
        if hashes is None:
            hashes = cache[block_size] = hash_token_blocks(token_ids, block_size, limit=self._max_prefix_blocks,
                                                           salt=request_cache_salt(pending_request))
        return hashes

    def _request_positions(self, pending_request: Optional[PendingRequest], hashes: Sequence[int],
                           block_size: int, num_bits: int, k: int):
        """The prompt's Bloom-filter bit positions for one filter shape, once per request (replicas of one
        deployment share a shape, so normally once)."""
        cache = getattr(pending_request, "_herd_block_hashes", None) if pending_request is not None else None
        if cache is None:
            return filter_probe(filter_positions(hashes, num_bits, k))
        key = ("positions", block_size, num_bits, k)
        positions = cache.get(key)
        if positions is None:
            positions = cache[key] = filter_probe(filter_positions(hashes, num_bits, k))
        return positions

    def match_blocks(self, replica: RunningReplica, hashes: Sequence[int], positions=None) -> int:
        """How many leading blocks of the prompt the replica is known to hold. O(prompt blocks).

        From the report's Bloom filter: the leading run of blocks the filter (or exact knowledge) holds. A
        false positive can only lengthen a run by a block now and then (probability fpr per block), which is
        why the filter is read as a leading run and never as "the deepest block it seems to hold".
        From exact knowledge (routed history, a format-1 hash list): the deepest block held, since a chain
        hash stands for its whole prefix; this keeps working when a capped list lost a conversation's head.
        `positions`: the filter probe of `hashes` if the caller has it (filter_probe(filter_positions(..)))."""
        v = self._state().get(replica.replica_id)
        if v is None:
            return 0
        exact = bool(v.reported or v.optimistic)
        best = 0
        if v.filter_bits is not None and len(hashes):
            if positions is None:
                positions = filter_positions(hashes, len(v.filter_bits) * 8, v.filter_k)
            hits = filter_hits(v.filter_bits, positions)
            best = len(hashes)
            for i in np.flatnonzero(~hits):
                if not (exact and v.holds(hashes[i])):
                    best = int(i)
                    break
        if exact:
            rep, opt = v.reported, v.optimistic
            tail = hashes[best:]
            if tail and not (opt.keys().isdisjoint(tail) and rep.isdisjoint(tail)):  # C-speed test first
                for k in range(len(hashes) - 1, best - 1, -1):
                    h = hashes[k]
                    if h in opt or h in rep:
                        return k + 1
        return best

    def load(self, replica: RunningReplica) -> float:
        """Requests at the replica: Serve's queue-length cache when it has an entry, else the last report."""
        q = self.replica_queue_len_cache.get(replica.replica_id)
        if q is not None:
            return float(q)
        v = self._state().get(replica.replica_id)
        if v is not None and v.num_running is not None:
            return float(v.num_running + (v.num_waiting or 0))
        return 0.0

    def _kv_free_fraction(self, replica: RunningReplica) -> float:
        v = self._state().get(replica.replica_id)
        if v is None or not v.kv_blocks_total:
            return 1.0
        return (v.kv_blocks_free or 0) / v.kv_blocks_total

    def kv_saturated(self, replica: RunningReplica) -> bool:
        """Its last report shows sequences waiting and almost no free KV blocks: a new prompt would wait for
        blocks, whatever its cached prefix saves."""
        v = self._state().get(replica.replica_id)
        if v is None or not v.num_waiting:
            return False
        return self._kv_free_fraction(replica) < self._kv_saturated

    # ---- the decision -------------------------------------------------------------------------------------
    def _power_of_two(self, candidates: list[RunningReplica]) -> list[list[RunningReplica]]:
        if len(candidates) <= 2:
            pair = random.sample(candidates, len(candidates))
            return [pair]
        pair = random.sample(candidates, 2)
        rest = [r for r in candidates if r not in pair]
        return [pair, rest]

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> list[list[RunningReplica]]:
        # A replica just found unavailable (broken stream, engine down) is left out while others remain:
        # Serve's router does not learn of it in time (cluster.unavailable_replicas).
        candidates = without_unavailable(candidate_replicas, replica_actor_id, self._unavailable_ttl_s)
        if not candidates:
            return []
        for r in candidates:  # cheap when nothing changed (identity check)
            self._ingest_report(r)
        self._record_report_ages(candidates)
        self._start_trace(pending_request)
        token_ids = request_token_ids(pending_request)
        if token_ids is None:  # not a generation (model_info, stats): nothing to match, not counted
            return self._power_of_two(candidates)
        ttl_cutoff = self._now() - self._ttl_s
        matches: dict[ReplicaID, int] = {}
        for r in candidates:
            v = self._state().get(r.replica_id)
            if v is not None:
                self._expire_optimistic(v, ttl_cutoff)
            block_size = self._block_size_for(r.replica_id)
            hashes = self._request_hashes(pending_request, token_ids, block_size)
            positions = None
            if v is not None and v.filter_bits is not None and hashes:
                positions = self._request_positions(pending_request, hashes, block_size,
                                                    len(v.filter_bits) * 8, v.filter_k)
            matches[r.replica_id] = self.match_blocks(r, hashes, positions)

        best = max(matches.values())
        best_replica = next(r for r in candidates if matches[r.replica_id] == best)
        block_size = self._block_size_for(best_replica.replica_id)
        hashed_tokens = min(len(token_ids), self._max_prefix_blocks * block_size)
        if best < self._min_match_blocks or best * block_size < self._min_match_fraction * hashed_tokens:
            self._note_decision(pending_request, "fallback", matches)
            return self._power_of_two(candidates)

        loads = {r.replica_id: self.load(r) for r in candidates}
        holders = [r for r in candidates if matches[r.replica_id] == best]
        random.shuffle(holders)  # equal in every respect: spread
        chosen = min(holders, key=lambda r: (loads[r.replica_id], -self._kv_free_fraction(r)))
        # Load wins over affinity: past the queue margin, or when the chosen replica's KV is saturated, the
        # least loaded replica(s) not saturated get the request (if every replica is saturated, the match does).
        unsaturated = [r for r in candidates if not self.kv_saturated(r)] or candidates
        least = min(loads[r.replica_id] for r in unsaturated)
        if loads[chosen.replica_id] - least > self._margin or chosen not in unsaturated:
            least_loaded = [r for r in unsaturated if loads[r.replica_id] == least]
            rest = [r for r in candidates if r not in least_loaded]
            self._note_decision(pending_request, "load", matches)
            return [least_loaded, rest] if rest else [least_loaded]
        rest = sorted((r for r in candidates if r is not chosen),
                      key=lambda r: (-matches[r.replica_id], loads[r.replica_id]))
        self._note_decision(pending_request, "affinity", matches)
        return [[chosen], rest] if rest else [[chosen]]

    # ---- metrics (cluster.metrics.RouterMetrics) -----------------------------------------------------------
    @staticmethod
    def _note_decision(pending_request: Optional[PendingRequest], reason: str,
                       matches: dict[ReplicaID, int]) -> None:
        """Keep why the request was ranked as it was, for on_request_routed to count once the replica that
        took it is known (Serve may call choose_replicas several times for one request)."""
        if pending_request is not None:
            try:
                setattr(pending_request, "_herd_decision", (reason, matches))
            except AttributeError:
                pass

    def _record_report_ages(self, candidates: list[RunningReplica]) -> None:
        now = time.time()
        views = self._state()
        for r in candidates:
            v = views.get(r.replica_id)
            if v is not None and v.report_at is not None:
                self._metrics.on_report_age(r.replica_id.unique_id, now - v.report_at)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        """Serve calls this once a replica accepted the request: remember its prompt blocks there."""
        token_ids = request_token_ids(pending_request)
        hashes = []
        reason, matches = getattr(pending_request, "_herd_decision", None) or ("fallback", {})
        if token_ids is not None:  # a generation (metrics count only those: see choose_replicas)
            block_size = self._block_size_for(replica_id)
            hashes = self._request_hashes(pending_request, token_ids, block_size)
            self.remember_routed(replica_id, hashes)
            self._metrics.on_decision(reason, len(hashes), matches.get(replica_id, 0))
        span = getattr(pending_request, "_herd_span", None)
        if span is not None:
            for key, value in (("herd.route.reason", reason), ("herd.route.prompt_blocks", len(hashes)),
                               ("herd.route.matched_blocks", matches.get(replica_id, 0)),
                               ("herd.replica", replica_id.unique_id)):
                tracing.set_attribute(span, key, value)
            tracing.end_span(span)

    @staticmethod
    def _start_trace(pending_request: Optional[PendingRequest]) -> None:
        """With tracing on: the request's router span, from its first routing attempt until a replica takes it
        (on_request_routed). The request's context (the `context` argument, cluster.request_context) then
        carries this span, so the replica's span is its child."""
        if not tracing.enabled() or pending_request is None or hasattr(pending_request, "_herd_span"):
            return
        context = request_argument(pending_request, _CONTEXT_ARG)
        if not isinstance(context, dict):
            return
        span = tracing.start_span("herd.router", context, {"herd.request_id": context.get("request_id")})
        try:
            setattr(pending_request, "_herd_span", span)
        except AttributeError:
            tracing.end_span(span)
            return
        tracing.inject(context, span)
