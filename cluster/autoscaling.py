"""Autoscaling policy for herd's model deployments (a Ray Serve 2.60 custom autoscaling policy).

CONTRACT — what the model deployment implements
===============================================
    def record_autoscaling_stats(self) -> dict[str, float]:      # may also be `async def`
        return cluster.autoscaling.autoscaling_stats(self.engine)

returning exactly (values int/float only; Serve checks the types on the first call and turns the replica's
custom metrics off for good if one is not a number):

    {"herd_running": <sequences the engine is running>,
     "herd_waiting": <sequences waiting in the engine's scheduler>,
     "herd_kv_usage": <KV-cache blocks in use / total, 0.0 .. 1.0>}

How it reaches the policy (Ray Serve 2.60, ray/serve/_private/replica.py and autoscaling_state.py): a
replica of a deployment that has an `autoscaling_config` calls `record_autoscaling_stats()` every
min(look_back_period_s * 0.2, metrics_interval_s) seconds (timeout RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S,
10 s), pushes the samples to the controller every `metrics_interval_s`, and the controller hands the policy
`ctx.aggregated_metrics[name][replica_id]` = the samples of the last `look_back_period_s` aggregated with the
config's `aggregation_function` (mean by default). The method must be cheap and never block on a step:
AsyncEngine.stats() is a snapshot.

Deployment options that go with this policy:
    autoscaling_config:
        policy: {policy_function: "cluster.autoscaling:llm_autoscaling_policy"}
        # or {policy_function: "cluster.autoscaling:LLMAutoscalingPolicy", policy_kwargs: {...}} to tune it
        min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s, look_back_period_s
    graceful_shutdown_timeout_s: longer than the longest generation (a replica being removed stops taking new
        requests and finishes its streams first; Serve kills it after this timeout)

The signal
==========
Each signal is a utilization: load divided by what one replica should carry, so 1.0 means "exactly as many
replicas as needed". The policy asks for current_replicas * max(utilizations):

- requests:  ctx.total_num_requests (running + queued, Serve's own count) / (replicas * target_ongoing_requests)
             — Serve's default policy; it is all there is until replicas report engine metrics.
- kv cache:  mean herd_kv_usage / target_kv_usage — long prompts fill the KV cache (and force preemption)
             long before the request count looks high.
- queue:     mean herd_waiting / target_waiting_per_replica — sequences the engine's scheduler could not
             admit are time-to-first-token piling up.

Scaling down is deliberate: nothing is removed while any engine has waiting sequences, and a downscale
targets `downscale_headroom` utilization (default 0.8) on the replicas that remain, so they are not at the
edge right after the change. The framework then applies upscaling_factor/downscaling_factor,
upscale_delay_s/downscale_delay_s (a decision must persist that long: the downscale delay lets a burst's
streams drain instead of flapping) and min/max replicas; the policy clamps to the capacity-adjusted bounds
itself as well, so it is correct on its own.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

RUNNING_KEY = "herd_running"
WAITING_KEY = "herd_waiting"
KV_USAGE_KEY = "herd_kv_usage"
STATE_KEY = "herd_autoscaling"   # what the last decision saw, kept in the policy state for inspection


def autoscaling_stats(engine: Any) -> dict[str, float]:
    """The replica's autoscaling metrics (what `record_autoscaling_stats()` returns)."""
    s = engine.stats()
    total = int(s.kv_blocks_total)
    used = total - int(s.kv_blocks_free)
    return {
        RUNNING_KEY: float(s.num_running),
        WAITING_KEY: float(s.num_waiting),
        KV_USAGE_KEY: (used / total) if total > 0 else 0.0,
    }


@dataclass
class LoadSignals:
    """What one autoscaling decision looks at."""

    current_replicas: int
    total_requests: float                 # running + queued, from Serve (handles and replicas)
    target_ongoing_requests: float
    mean_kv_usage: Optional[float] = None  # over replicas that reported; None: no reports yet
    mean_waiting: Optional[float] = None
    total_waiting: float = 0.0
    reporting_replicas: int = 0


@dataclass
class Decision:
    desired: float                         # replicas wanted (before the framework's factors and delays)
    utilization: float                     # the max of the utilizations below
    request_utilization: float
    kv_utilization: Optional[float]
    queue_utilization: Optional[float]
    reason: str


def _mean(values) -> Optional[float]:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(values) / len(values) if values else None


def signals_from_context(ctx: Any) -> LoadSignals:
    """Collect the signals from Serve's AutoscalingContext (aggregated replica metrics may be missing)."""
    metrics = ctx.aggregated_metrics or {}
    running = set(ctx.running_replicas or [])

    def per_replica(key: str) -> dict:
        values = metrics.get(key) or {}
        return {rid: v for rid, v in values.items() if not running or rid in running}

    kv, waiting = per_replica(KV_USAGE_KEY), per_replica(WAITING_KEY)
    target = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 2.0
    return LoadSignals(
        current_replicas=int(ctx.current_num_replicas),
        total_requests=float(ctx.total_num_requests or 0.0),
        target_ongoing_requests=float(target),
        mean_kv_usage=_mean(kv.values()),
        mean_waiting=_mean(waiting.values()),
        total_waiting=float(sum(waiting.values())) if waiting else 0.0,
        reporting_replicas=len(set(kv) | set(waiting)),
    )


def decide(sig: LoadSignals, *, min_replicas: int, max_replicas: int, target_kv_usage: float = 0.8,
           target_waiting_per_replica: float = 2.0, downscale_headroom: float = 0.8) -> Decision:
    """The pure decision: how many replicas this load needs. No clocks and no Serve objects."""
    n = sig.current_replicas
    if n <= 0:
        # Nothing runs: one replica if anything asks for one (the framework's cold-start path does the same).
        desired = 1.0 if sig.total_requests > 0 else 0.0
        desired = float(min(max(desired, min_replicas), max_replicas))
        return Decision(desired, 0.0, 0.0, None, None, "no running replicas")

    u_req = sig.total_requests / (n * sig.target_ongoing_requests)
    u_kv = sig.mean_kv_usage / target_kv_usage if sig.mean_kv_usage is not None else None
    u_queue = sig.mean_waiting / target_waiting_per_replica if sig.mean_waiting is not None else None
    candidates = {"requests": u_req, "kv cache": u_kv, "queue": u_queue}
    reason, u = max(((k, v) for k, v in candidates.items() if v is not None), key=lambda kv: kv[1])
    desired = n * u

    if desired < n:
        if sig.total_waiting > 0:
            desired, reason = float(n), "hold: engines have waiting sequences"
        else:
            # Leave the remaining replicas at `downscale_headroom` utilization, not at the edge.
            desired = min(float(n), n * u / downscale_headroom)
            reason = f"{reason} (downscale to {downscale_headroom:.0%} utilization)"
    desired = float(min(max(desired, float(min_replicas)), float(max_replicas)))
    return Decision(desired, u, u_req, u_kv, u_queue, reason)


class LLMAutoscalingPolicy:
    """Configurable form: `policy_function: "cluster.autoscaling:LLMAutoscalingPolicy"` with `policy_kwargs`
    (Serve instantiates a class policy once with those kwargs and calls it every control-loop tick)."""

    def __init__(self, target_kv_usage: float = 0.8, target_waiting_per_replica: float = 2.0,
                 downscale_headroom: float = 0.8):
        if not 0 < target_kv_usage <= 1 or not 0 < downscale_headroom <= 1 or target_waiting_per_replica <= 0:
            raise ValueError("target_kv_usage and downscale_headroom must be in (0, 1], "
                             "target_waiting_per_replica > 0")
        self.target_kv_usage = target_kv_usage
        self.target_waiting_per_replica = target_waiting_per_replica
        self.downscale_headroom = downscale_headroom

    def __call__(self, ctx: Any) -> tuple[float, dict[str, Any]]:
        sig = signals_from_context(ctx)
        d = decide(sig, min_replicas=ctx.capacity_adjusted_min_replicas,
                   max_replicas=ctx.capacity_adjusted_max_replicas, target_kv_usage=self.target_kv_usage,
                   target_waiting_per_replica=self.target_waiting_per_replica,
                   downscale_headroom=self.downscale_headroom)
        state = dict(ctx.policy_state or {})
        state[STATE_KEY] = {**asdict(d), "signals": asdict(sig)}
        return d.desired, state


_default_policy = LLMAutoscalingPolicy()


def llm_autoscaling_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """`policy_function: "cluster.autoscaling:llm_autoscaling_policy"` — LLMAutoscalingPolicy with defaults."""
    return _default_policy(ctx)
