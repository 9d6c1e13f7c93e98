"""The LLM autoscaling policy on synthetic AutoscalingContexts (Serve's real context and config classes), alone
and wrapped the way Serve 2.60 wraps a custom policy (scaling factors, delays)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.autoscaling import (
    KV_USAGE_KEY,
    RUNNING_KEY,
    STATE_KEY,
    WAITING_KEY,
    LLMAutoscalingPolicy,
    LoadSignals,
    autoscaling_stats,
    decide,
    llm_autoscaling_policy,
    signals_from_context,
)
from cluster.ray_node_start import init_local_ray
from tests.serve_fixtures import stop_herd_cluster

DEP = DeploymentID(name="llm", app_name="herd")


def replicas(n):
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(n)]


def context(n, *, requests=0.0, kv=None, waiting=None, target=4, min_replicas=1, max_replicas=8,
            policy_state=None, **config):
    """n running replicas; kv / waiting: one value per replica (None: not reported)."""
    reps = replicas(n)
    metrics = {}
    if kv is not None:
        metrics[KV_USAGE_KEY] = dict(zip(reps, kv))
        metrics[RUNNING_KEY] = {r: 1.0 for r in reps}
    if waiting is not None:
        metrics[WAITING_KEY] = dict(zip(reps, waiting))
    cfg = AutoscalingConfig(min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target,
                            policy={"policy_function": "cluster.autoscaling:llm_autoscaling_policy"}, **config)
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=n,
        target_num_replicas=n, running_replicas=reps, total_num_requests=requests, total_queued_requests=0.0,
        aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=min_replicas,
        capacity_adjusted_max_replicas=max_replicas, policy_state=dict(policy_state or {}),
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=cfg)


# ---- the pure decision ---------------------------------------------------------------------------------------
def test_request_load_alone_matches_serve_default():
    d = decide(LoadSignals(current_replicas=2, total_requests=16, target_ongoing_requests=4),
               min_replicas=1, max_replicas=10)
    assert d.desired == 4 and d.reason == "requests"


def test_kv_pressure_scales_up_when_request_count_looks_low():
    # 2 replicas, few (long) requests, KV caches 96% full: 2 * 0.96 / 0.8 = 2.4 replicas.
    d = decide(LoadSignals(current_replicas=2, total_requests=3, target_ongoing_requests=8, mean_kv_usage=0.96,
                           mean_waiting=0.0), min_replicas=1, max_replicas=10)
    assert d.reason == "kv cache" and d.desired == pytest.approx(2.4)


def test_waiting_sequences_scale_up():
    d = decide(LoadSignals(current_replicas=2, total_requests=8, target_ongoing_requests=8, mean_kv_usage=0.5,
                           mean_waiting=6.0, total_waiting=12), min_replicas=1, max_replicas=10)
    assert d.reason == "queue" and d.desired == pytest.approx(6.0)


def test_no_downscale_while_engines_queue():
    d = decide(LoadSignals(current_replicas=4, total_requests=2, target_ongoing_requests=8, mean_kv_usage=0.1,
                           mean_waiting=0.5, total_waiting=2), min_replicas=1, max_replicas=10)
    assert d.desired == 4 and d.reason.startswith("hold")


def test_downscale_leaves_headroom():
    # 4 replicas at 40% request utilization: 1.6 replicas of load -> 2 at 80% target utilization.
    d = decide(LoadSignals(current_replicas=4, total_requests=6.4, target_ongoing_requests=4, mean_kv_usage=0.1,
                           mean_waiting=0.0), min_replicas=1, max_replicas=10, downscale_headroom=0.8)
    assert d.desired == pytest.approx(2.0)
    # Slightly under target: no downscale to a replica count that would run hot.
    d = decide(LoadSignals(current_replicas=4, total_requests=15, target_ongoing_requests=4),
               min_replicas=1, max_replicas=10)
    assert d.desired == 4


def test_bounds_are_respected():
    hot = LoadSignals(current_replicas=3, total_requests=1000, target_ongoing_requests=4)
    assert decide(hot, min_replicas=1, max_replicas=5).desired == 5
    idle = LoadSignals(current_replicas=3, total_requests=0, target_ongoing_requests=4)
    assert decide(idle, min_replicas=2, max_replicas=5).desired == 2
    assert decide(LoadSignals(0, 0, 4), min_replicas=0, max_replicas=5).desired == 0
    assert decide(LoadSignals(0, 3, 4), min_replicas=0, max_replicas=5).desired == 1


# ---- from Serve's context ------------------------------------------------------------------------------------
def test_signals_from_context_averages_reporting_replicas_only():
    ctx = context(3, requests=5, kv=[0.2, 0.4, 0.9], waiting=[0, 3, 1])
    sig = signals_from_context(ctx)
    assert sig.current_replicas == 3 and sig.total_requests == 5 and sig.target_ongoing_requests == 4
    assert sig.mean_kv_usage == pytest.approx(0.5) and sig.mean_waiting == pytest.approx(4 / 3)
    assert sig.total_waiting == 4 and sig.reporting_replicas == 3
    bare = signals_from_context(context(2, requests=1))     # no replica reported engine metrics yet
    assert bare.mean_kv_usage is None and bare.mean_waiting is None and bare.reporting_replicas == 0


def test_policy_returns_desired_and_keeps_its_state():
    desired, state = llm_autoscaling_policy(context(2, requests=4, kv=[0.95, 0.85], waiting=[0, 0],
                                                    policy_state={"other": 1}))
    assert desired == pytest.approx(2 * 0.9 / 0.8)
    assert state["other"] == 1 and state[STATE_KEY]["reason"] == "kv cache"
    tuned = LLMAutoscalingPolicy(target_kv_usage=0.95)
    # At 0.95 target the same load is under 1.0 utilization, but not low enough to leave 80% headroom on 1.
    assert tuned(context(2, requests=4, kv=[0.95, 0.85], waiting=[0, 0]))[0] == 2
    with pytest.raises(ValueError):
        LLMAutoscalingPolicy(target_kv_usage=1.5)


def test_wrapped_like_serve_applies_delays():
    """Serve wraps a custom policy with _apply_autoscaling_config: the decision must persist for
    upscale_delay_s / downscale_delay_s before it takes effect."""
    policy = _apply_autoscaling_config(llm_autoscaling_policy)
    state: dict = {}

    def tick(n, **kw):
        nonlocal state
        decision, state = policy(context(n, policy_state=state, upscale_delay_s=0.0, downscale_delay_s=0.3, **kw))
        return decision

    # Upscale with no delay: 2 replicas, KV full -> ceil(2 * 1.0 / 0.8) = 3.
    assert tick(2, requests=2, kv=[1.0, 1.0], waiting=[0, 0]) == 3
    # Idle: the downscale waits out downscale_delay_s (streams drain meanwhile).
    assert tick(3, requests=0, kv=[0, 0, 0], waiting=[0, 0, 0]) == 3
    time.sleep(0.35)
    assert tick(3, requests=0, kv=[0, 0, 0], waiting=[0, 0, 0]) == 1
    # A waiting queue cancels a pending downscale.
    assert tick(3, requests=0, kv=[0, 0, 0], waiting=[0, 0, 0]) == 3
    assert tick(3, requests=0, kv=[0, 0, 0], waiting=[0, 1, 0]) == 3
    time.sleep(0.35)
    assert tick(3, requests=0, kv=[0, 0, 0], waiting=[0, 0, 0]) == 3   # the delay starts over


def test_autoscaling_stats_shape():
    @dataclass
    class S:
        num_running: int = 5
        num_waiting: int = 2
        kv_blocks_total: int = 200
        kv_blocks_free: int = 50

    class E:
        def stats(self):
            return S()

    out = autoscaling_stats(E())
    assert out == {RUNNING_KEY: 5.0, WAITING_KEY: 2.0, KV_USAGE_KEY: 0.75}
    assert all(isinstance(v, float) for v in out.values())


def test_serve_loads_both_policy_forms():
    """Serve cloudpickles the policy by value and, for a class, instantiates it once with policy_kwargs."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    fn = AutoscalingConfig(policy={"policy_function": "cluster.autoscaling:llm_autoscaling_policy"}).policy
    assert _resolve_policy_callable(fn)(context(2, requests=16))[0] == 4
    cls = AutoscalingConfig(policy={"policy_function": "cluster.autoscaling:LLMAutoscalingPolicy",
                                    "policy_kwargs": {"target_kv_usage": 0.5}}).policy
    tuned = _resolve_policy_callable(cls)
    assert tuned.target_kv_usage == 0.5
    assert tuned(context(2, requests=0, kv=[0.5, 0.5], waiting=[0, 0]))[0] == 2


@pytest.mark.slow
def test_replica_reported_kv_usage_scales_a_real_deployment():
    """Serve 2.60's path end to end: replicas' record_autoscaling_stats() -> controller -> ctx.aggregated_metrics
    -> llm_autoscaling_policy. No request is ever sent (Serve's request-based policy would stay at 1); a full
    KV cache alone must bring the deployment to max_replicas."""
    from ray import serve

    init_local_ray(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                   log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")

        @serve.deployment(ray_actor_options={"num_cpus": 0}, autoscaling_config={
            "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4, "upscale_delay_s": 0.0,
            "downscale_delay_s": 600.0, "look_back_period_s": 1.0, "metrics_interval_s": 0.5,
            "policy": {"policy_function": "cluster.autoscaling:llm_autoscaling_policy"}})
        class FullKV:
            def record_autoscaling_stats(self) -> dict:
                from types import SimpleNamespace

                from cluster.autoscaling import autoscaling_stats
                engine = SimpleNamespace(stats=lambda: SimpleNamespace(
                    num_running=3, num_waiting=0, kv_blocks_total=100, kv_blocks_free=0))
                return autoscaling_stats(engine)

            def __call__(self) -> str:
                return "ok"

        serve.run(FullKV.bind(), name="kv", route_prefix=None)
        deadline, running = time.monotonic() + 90, 0
        while time.monotonic() < deadline:
            states = serve.status().applications["kv"].deployments["FullKV"].replica_states
            running = states.get("RUNNING", 0)
            if running == 2:
                break
            time.sleep(0.5)
        assert running == 2, f"did not scale to 2 replicas on KV usage: {states}"
    finally:
        stop_herd_cluster()
