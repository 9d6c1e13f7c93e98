"""Per-replica serving metrics, exported through Ray's metrics agent (`ray.util.metrics`).

Ray exports every series with a `ray_` prefix on each node's metrics port, so `herd_requests_total` below is
scraped as `ray_herd_requests_total` — the names the Grafana dashboard in the Helm chart queries. Every series
is tagged `model` and `replica`; errors also carry `code` (a gRPC status code name, e.g. RESOURCE_EXHAUSTED).

| series (without the ray_ prefix)        | type      | fed by                                |
|-----------------------------------------|-----------|---------------------------------------|
| herd_requests_total                     | counter   | on_request()                          |
| herd_request_errors_total{code}         | counter   | on_error(code)                        |
| herd_time_to_first_token_seconds        | histogram | on_first_token(seconds)               |
| herd_inter_token_latency_seconds        | histogram | on_token(seconds)                     |
| herd_queue_depth                        | gauge     | update_engine(stats): num_waiting     |
| herd_running_sequences                  | gauge     | update_engine(stats): num_running     |
| herd_kv_blocks_used / herd_kv_blocks_free | gauge   | update_engine(stats)                  |
| herd_prefix_cache_hit_tokens_total      | counter   | update_engine (or on_finish, see below) |
| herd_prompt_tokens_total                | counter   | update_engine (or on_finish)          |
| herd_generation_tokens_total            | counter   | update_engine (or on_finish)          |

The three token counters have exactly one source per replica, so nothing is counted twice:
`token_source="engine"` (the default) takes them from the engine's cumulative counters in `update_engine`
(turned into increments here; everything the engine processed, aborted requests included);
`token_source="requests"` takes them from `on_finish` (what finished requests reported), for a replica with
no engine statistics. The other source's token arguments are then ignored.

Call `update_engine(engine.stats())` every second or two (e.g. from a background task of the replica);
the gauges are only as fresh as that call.
"""
from __future__ import annotations

import threading
from typing import Any

from ray.util import metrics as ray_metrics

# Latency buckets in seconds. TTFT spans a cached short prompt (ms) to a long prefill behind a queue (tens of s);
# inter-token latency is one decode step (ms) up to a preemption stall.
TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]

TAG_KEYS = ("model", "replica")

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None


def _get_metrics() -> dict[str, Any]:
    """The process-wide metric objects (created once: several ReplicaMetrics in one process share them and
    tell their series apart by tags)."""
    global _metrics
    with _lock:
        if _metrics is None:
            c, g, h = ray_metrics.Counter, ray_metrics.Gauge, ray_metrics.Histogram
            _metrics = {
                "requests": c("herd_requests_total", "Requests received by a model replica.", TAG_KEYS),
                "errors": c("herd_request_errors_total", "Requests that failed, by gRPC status code name.",
                            TAG_KEYS + ("code",)),
                "ttft": h("herd_time_to_first_token_seconds", "Time from request arrival to its first token.",
                          TTFT_BUCKETS_S, TAG_KEYS),
                "itl": h("herd_inter_token_latency_seconds", "Time between consecutive streamed tokens.",
                         ITL_BUCKETS_S, TAG_KEYS),
                "queue": g("herd_queue_depth", "Sequences waiting in the engine's scheduler.", TAG_KEYS),
                "running": g("herd_running_sequences", "Sequences the engine is running.", TAG_KEYS),
                "kv_used": g("herd_kv_blocks_used", "KV-cache blocks in use.", TAG_KEYS),
                "kv_free": g("herd_kv_blocks_free", "KV-cache blocks free (cached-but-unreferenced included).",
                             TAG_KEYS),
                "hit_tokens": c("herd_prefix_cache_hit_tokens_total",
                                "Prompt tokens whose KV came from the prefix cache.", TAG_KEYS),
                "prompt_tokens": c("herd_prompt_tokens_total", "Prompt tokens processed.", TAG_KEYS),
                "generation_tokens": c("herd_generation_tokens_total", "Tokens generated.", TAG_KEYS),
            }
        return _metrics


# EngineStats field -> metric key of the counter it feeds.
_ENGINE_COUNTERS = {
    "prefix_cache_hit_tokens": "hit_tokens",
    "prompt_tokens": "prompt_tokens",
    "generation_tokens": "generation_tokens",
}


class ReplicaMetrics:
    """Metrics of one model replica. Cheap to call from the request path; thread-safe enough for a replica
    (Ray's recorders are), and the engine-counter bookkeeping is guarded by a lock."""

    def __init__(self, model: str, replica_id: str, *, token_source: str = "engine"):
        if token_source not in ("engine", "requests"):
            raise ValueError("token_source must be 'engine' or 'requests'")
        self.model = model
        self.replica_id = replica_id
        self.token_source = token_source
        self._tags = {"model": model, "replica": replica_id}
        self._m = _get_metrics()
        self._last_engine: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---- request path ---------------------------------------------------------------------------------
    def on_request(self) -> None:
        self._m["requests"].inc(1, tags=self._tags)

    def on_first_token(self, seconds: float) -> None:
        self._m["ttft"].observe(max(0.0, float(seconds)), tags=self._tags)

    def on_token(self, seconds: float, num_tokens: int = 1) -> None:
        """One inter-token gap. A chunk of `num_tokens` tokens that arrived `seconds` after the previous chunk
        counts as `num_tokens` gaps of seconds / num_tokens each."""
        if num_tokens < 1:
            return
        gap = max(0.0, float(seconds)) / num_tokens
        for _ in range(num_tokens):
            self._m["itl"].observe(gap, tags=self._tags)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        """A request finished. Feeds the token counters only with token_source="requests"."""
        if self.token_source != "requests":
            return
        for key, value in (("prompt_tokens", prompt_tokens), ("generation_tokens", completion_tokens),
                           ("hit_tokens", cached_tokens)):
            if value > 0:
                self._m[key].inc(value, tags=self._tags)

    def on_error(self, code: str) -> None:
        self._m["errors"].inc(1, tags={**self._tags, "code": str(code)})

    # ---- engine snapshot --------------------------------------------------------------------------------
    def update_engine(self, stats: Any) -> None:
        """Set the gauges from an EngineStats snapshot and (token_source="engine") add the growth of its
        cumulative counters since the previous snapshot. A counter that went down means the engine was
        restarted: its new value is all growth."""
        m, tags = self._m, self._tags
        total, free = int(stats.kv_blocks_total), int(stats.kv_blocks_free)
        m["queue"].set(int(stats.num_waiting), tags=tags)
        m["running"].set(int(stats.num_running), tags=tags)
        m["kv_used"].set(total - free, tags=tags)
        m["kv_free"].set(free, tags=tags)
        if self.token_source != "engine":
            return
        with self._lock:
            for field, key in _ENGINE_COUNTERS.items():
                now = int(getattr(stats, field))
                before = self._last_engine.get(field, 0)
                delta = now - before if now >= before else now
                self._last_engine[field] = now
                if delta > 0:
                    m[key].inc(delta, tags=tags)
