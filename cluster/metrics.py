"""Serving metrics, exported through Ray's metrics agent (`ray.util.metrics`): per model replica, and per router.

Ray exports every series with a `ray_` prefix on each node's metrics port, so `herd_requests_total` below is
scraped as `ray_herd_requests_total` — the names the Grafana dashboard in the Helm chart queries. Every herd
series is tagged `model` and `replica`; errors also carry `code` (a gRPC status code name).

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

vLLM's names for the same quantities
------------------------------------
Beside herd's own, each replica records the series a vLLM dashboard or autoscaler reads, tagged `model_name`
(and `replica`). Ray cannot export a name with ':' — `ray.util.metrics` accepts it with a FutureWarning,
and its OpenTelemetry exporter (Ray 2.60's default) then drops the series: measured, nothing appears on the
endpoint. So they are registered exactly as vLLM's own Ray stat logger registers them under Ray Serve LLM
(vllm/v1/metrics/ray_wrappers.py: ':' becomes '_'), and they come out as Ray Serve LLM's vLLM series do,
under the names Ray's own "Serve LLM" Grafana dashboard queries (Ray adds `_total` to a counter):

| vLLM (standalone, prometheus_client)  | on Ray's endpoint (herd, Ray Serve LLM)  | herd's source                   |
|---------------------------------------|------------------------------------------|---------------------------------|
| vllm:num_requests_running             | ray_vllm_num_requests_running            | engine num_running              |
| vllm:num_requests_waiting             | ray_vllm_num_requests_waiting            | engine num_waiting              |
| vllm:kv_cache_usage_perc              | ray_vllm_kv_cache_usage_perc             | 1 - free/total KV blocks (0..1) |
| vllm:time_to_first_token_seconds      | ray_vllm_time_to_first_token_seconds     | on_first_token                  |
| vllm:inter_token_latency_seconds      | ray_vllm_inter_token_latency_seconds     | on_token                        |
| vllm:e2e_request_latency_seconds      | ray_vllm_e2e_request_latency_seconds     | on_finish(e2e_seconds=...)      |
| vllm:prompt_tokens_total              | ray_vllm_prompt_tokens_total             | prompt tokens (as herd's)       |
| vllm:generation_tokens_total          | ray_vllm_generation_tokens_total         | generated tokens (as herd's)    |
| vllm:prefix_cache_queries_total       | ray_vllm_prefix_cache_queries_total      | prompt tokens, prefix caching on |
| vllm:prefix_cache_hits_total          | ray_vllm_prefix_cache_hits_total         | prompt tokens found cached      |

A dashboard written for a standalone vLLM server (`vllm:...` names) reads them after one Prometheus
relabeling rule on the Ray scrape job (docs/operations.md):
`metric_relabel_configs: [{source_labels: [__name__], regex: "ray_vllm_(.*)", target_label: __name__,
replacement: "vllm:$1"}]`.

The token counters have exactly one source per replica, so nothing is counted twice:
`token_source="engine"` (the default) takes them from the engine's cumulative counters in `update_engine`
(turned into increments here; everything the engine processed, aborted requests included);
`token_source="requests"` takes them from `on_finish` (what finished requests reported), for a replica with
no engine statistics. The other source's token arguments are then ignored.

Call `update_engine(engine.stats())` every second or two (e.g. from a background task of the replica);
the gauges are only as fresh as that call.

Router metrics (`RouterMetrics`, recorded by cluster.routing.PrefixCacheRouter in the process that routes: the
ingress), tagged `model`:

| herd_router_decisions_total{reason}     | counter   | affinity (the best-matching replica), load (a match existed, but load or KV saturation sent it elsewhere), fallback (no match: power of two choices) |
| herd_router_prompt_blocks_total         | counter   | full prompt blocks of routed requests |
| herd_router_matched_blocks_total        | counter   | of those, blocks the chosen replica was known to hold (hit rate = matched / prompt) |
| herd_router_report_age_seconds{replica} | gauge     | age of the router's latest routing report of each replica, at its latest decision |
"""
from __future__ import annotations

import threading
from typing import Any

from ray.util import metrics as ray_metrics

# Latency buckets in seconds. TTFT spans a cached short prompt (ms) to a long prefill behind a queue (tens of s);
# inter-token latency is one decode step (ms) up to a preemption stall; a whole request, up to minutes.
TTFT_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
E2E_BUCKETS_S = [0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]

TAG_KEYS = ("model", "replica")
VLLM_TAG_KEYS = ("model_name", "replica")
ROUTER_TAG_KEYS = ("model",)


# herd's series -> vLLM's series of the same quantity (a dashboard shows one of the two).
VLLM_TWINS = {
    "herd_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "herd_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "herd_queue_depth": "vllm:num_requests_waiting",
    "herd_running_sequences": "vllm:num_requests_running",
    "herd_kv_blocks_used": "vllm:kv_cache_usage_perc",
    "herd_kv_blocks_free": "vllm:kv_cache_usage_perc",
    "herd_prefix_cache_hit_tokens_total": "vllm:prefix_cache_hits",
    "herd_prompt_tokens_total": "vllm:prompt_tokens",
    "herd_generation_tokens_total": "vllm:generation_tokens",
}


def vllm_series_name(vllm_name: str) -> str:
    """The name to register a vLLM metric under so that Ray exports it (':' -> '_', as vLLM's Ray logger does).
    On the endpoint it is then `ray_` + this (+ `_total` for a counter)."""
    return vllm_name.replace(":", "_")


_lock = threading.Lock()
_metrics: dict[str, Any] | None = None
_router_metrics: dict[str, Any] | None = None


def _get_metrics() -> dict[str, Any]:
    """The process-wide metric objects (created once: several ReplicaMetrics in one process share them and
    tell their series apart by tags)."""
    global _metrics
    with _lock:
        if _metrics is None:
            c, g, h = ray_metrics.Counter, ray_metrics.Gauge, ray_metrics.Histogram
            v = vllm_series_name
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
                # vLLM's names for the same quantities (module doc).
                "vllm_running": g(v("vllm:num_requests_running"), "Number of requests in model execution batches.",
                                  VLLM_TAG_KEYS),
                "vllm_waiting": g(v("vllm:num_requests_waiting"), "Number of requests waiting to be processed.",
                                  VLLM_TAG_KEYS),
                "vllm_kv_usage": g(v("vllm:kv_cache_usage_perc"), "KV-cache usage. 1 means 100 percent usage.",
                                   VLLM_TAG_KEYS),
                "vllm_ttft": h(v("vllm:time_to_first_token_seconds"), "Histogram of time to first token in seconds.",
                               TTFT_BUCKETS_S, VLLM_TAG_KEYS),
                "vllm_itl": h(v("vllm:inter_token_latency_seconds"), "Histogram of inter-token latency in seconds.",
                              ITL_BUCKETS_S, VLLM_TAG_KEYS),
                "vllm_e2e": h(v("vllm:e2e_request_latency_seconds"),
                              "Histogram of e2e request latency in seconds.", E2E_BUCKETS_S, VLLM_TAG_KEYS),
                "vllm_prompt_tokens": c(v("vllm:prompt_tokens"), "Number of prefill tokens processed.",
                                        VLLM_TAG_KEYS),
                "vllm_generation_tokens": c(v("vllm:generation_tokens"), "Number of generation tokens processed.",
                                            VLLM_TAG_KEYS),
                "vllm_prefix_queries": c(v("vllm:prefix_cache_queries"),
                                         "Prefix cache queries, in terms of number of queried tokens.", VLLM_TAG_KEYS),
                "vllm_prefix_hits": c(v("vllm:prefix_cache_hits"),
                                      "Prefix cache hits, in terms of number of cached tokens.", VLLM_TAG_KEYS),
            }
        return _metrics


def _get_router_metrics() -> dict[str, Any]:
    global _router_metrics
    with _lock:
        if _router_metrics is None:
            c, g = ray_metrics.Counter, ray_metrics.Gauge
            _router_metrics = {
                "decisions": c("herd_router_decisions_total",
                               "Routing decisions by reason: affinity, load, fallback.", ROUTER_TAG_KEYS + ("reason",)),
                "prompt_blocks": c("herd_router_prompt_blocks_total", "Full prompt blocks of routed requests.",
                                   ROUTER_TAG_KEYS),
                "matched_blocks": c("herd_router_matched_blocks_total",
                                    "Prompt blocks the chosen replica was known to hold.", ROUTER_TAG_KEYS),
                "report_age": g("herd_router_report_age_seconds",
                                "Age of the router's latest routing report of a replica.", ROUTER_TAG_KEYS + ("replica",)),
            }
        return _router_metrics


# EngineStats field -> metric keys of the counters it feeds (herd's, then vLLM's).
_ENGINE_COUNTERS = {
    "prefix_cache_hit_tokens": ("hit_tokens", "vllm_prefix_hits"),
    "prompt_tokens": ("prompt_tokens", "vllm_prompt_tokens"),
    "generation_tokens": ("generation_tokens", "vllm_generation_tokens"),
}


class ReplicaMetrics:
    """Metrics of one model replica. Cheap to call from the request path; thread-safe enough for a replica
    (Ray's recorders are), and the engine-counter bookkeeping is guarded by a lock.

    prefix_caching: whether the engine looks prompts up in a prefix cache; vLLM counts a prompt's tokens as
    prefix-cache queries only then."""

    def __init__(self, model: str, replica_id: str, *, token_source: str = "engine", prefix_caching: bool = True):
        if token_source not in ("engine", "requests"):
            raise ValueError("token_source must be 'engine' or 'requests'")
        self.model = model
        self.replica_id = replica_id
        self.token_source = token_source
        self.prefix_caching = bool(prefix_caching)
        self._tags = {"model": model, "replica": replica_id}
        self._vtags = {"model_name": model, "replica": replica_id}
        self._m = _get_metrics()
        self._last_engine: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---- request path ---------------------------------------------------------------------------------
    def on_request(self) -> None:
        self._m["requests"].inc(1, tags=self._tags)

    def on_first_token(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        self._m["ttft"].observe(seconds, tags=self._tags)
        self._m["vllm_ttft"].observe(seconds, tags=self._vtags)

    def on_token(self, seconds: float, num_tokens: int = 1) -> None:
        """One inter-token gap. A chunk of `num_tokens` tokens that arrived `seconds` after the previous chunk
        counts as `num_tokens` gaps of seconds / num_tokens each."""
        if num_tokens < 1:
            return
        gap = max(0.0, float(seconds)) / num_tokens
        itl, vitl = self._m["itl"], self._m["vllm_itl"]
        for _ in range(num_tokens):
            itl.observe(gap, tags=self._tags)
            vitl.observe(gap, tags=self._vtags)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                  e2e_seconds: float | None = None) -> None:
        """A request finished (`e2e_seconds`: from its arrival at the replica to its last token). Feeds the token
        counters only with token_source="requests"."""
        if e2e_seconds is not None:
            self._m["vllm_e2e"].observe(max(0.0, float(e2e_seconds)), tags=self._vtags)
        if self.token_source != "requests":
            return
        for field, value in (("prompt_tokens", prompt_tokens), ("generation_tokens", completion_tokens),
                             ("prefix_cache_hit_tokens", cached_tokens)):
            self._count(field, value)

    def on_error(self, code: str) -> None:
        self._m["errors"].inc(1, tags={**self._tags, "code": str(code)})

    def _count(self, field: str, value: int) -> None:
        """Add `value` of an EngineStats token counter to herd's and vLLM's series."""
        if value <= 0:
            return
        herd_key, vllm_key = _ENGINE_COUNTERS[field]
        self._m[herd_key].inc(value, tags=self._tags)
        self._m[vllm_key].inc(value, tags=self._vtags)
        if field == "prompt_tokens" and self.prefix_caching:
            self._m["vllm_prefix_queries"].inc(value, tags=self._vtags)

    # ---- engine snapshot --------------------------------------------------------------------------------
    def update_engine(self, stats: Any) -> None:
        """Set the gauges from an EngineStats snapshot and (token_source="engine") add the growth of its
        cumulative counters since the previous snapshot. A counter that went down means the engine was
        restarted: its new value is all growth."""
        m, tags, vtags = self._m, self._tags, self._vtags
        total, free = int(stats.kv_blocks_total), int(stats.kv_blocks_free)
        m["queue"].set(int(stats.num_waiting), tags=tags)
        m["running"].set(int(stats.num_running), tags=tags)
        m["kv_used"].set(total - free, tags=tags)
        m["kv_free"].set(free, tags=tags)
        m["vllm_waiting"].set(int(stats.num_waiting), tags=vtags)
        m["vllm_running"].set(int(stats.num_running), tags=vtags)
        m["vllm_kv_usage"].set((total - free) / total if total > 0 else 0.0, tags=vtags)
        if self.token_source != "engine":
            return
        with self._lock:
            for field in _ENGINE_COUNTERS:
                now = int(getattr(stats, field))
                before = self._last_engine.get(field, 0)
                delta = now - before if now >= before else now
                self._last_engine[field] = now
                self._count(field, delta)


class RouterMetrics:
    """Metrics of one deployment's router (one per router object; cheap: a few counter increments a decision)."""

    def __init__(self, model: str):
        self.model = model
        self._tags = {"model": model}
        self._m = _get_router_metrics()

    def on_decision(self, reason: str, prompt_blocks: int, matched_blocks: int) -> None:
        """A request was routed: why its replica was chosen, how many full blocks its prompt has and how many
        of them the chosen replica was known to hold."""
        m = self._m
        m["decisions"].inc(1, tags={**self._tags, "reason": reason})
        if prompt_blocks > 0:
            m["prompt_blocks"].inc(prompt_blocks, tags=self._tags)
        if matched_blocks > 0:
            m["matched_blocks"].inc(matched_blocks, tags=self._tags)

    def on_report_age(self, replica: str, age_s: float) -> None:
        self._m["report_age"].set(max(0.0, float(age_s)), tags={**self._tags, "replica": replica})
