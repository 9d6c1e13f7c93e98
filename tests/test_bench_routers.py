"""`herd bench serve`'s router comparison: the round-robin baseline, and the figures derived from the runs
(hit rate against the ideal single replica, throughput against Serve's default router), without a cluster."""
from __future__ import annotations

import asyncio

import benchmarks.serve_bench as sb
from benchmarks.baseline_routers import RoundRobinRouter
from tests.test_routing import DEP, FakeReplica, request


def test_round_robin_takes_replicas_in_turn():
    from ray.serve._private.common import DeploymentHandleSource

    async def main():
        router = RoundRobinRouter(deployment_id=DEP, handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state(block_size=16, load_imbalance_margin=8)   # the prefix router's kwargs
        reps = [FakeReplica(n) for n in ("c", "a", "b")]
        firsts = []
        for _ in range(6):
            ranks = await router.choose_replicas(reps, request(range(40)))
            assert sorted(r.replica_id.unique_id for g in ranks for r in g) == ["a", "b", "c"]
            firsts.append(ranks[0][0].replica_id.unique_id)
        return firsts

    assert asyncio.run(main()) == ["a", "b", "c", "a", "b", "c"]


def test_compare_routers_figures(monkeypatch, tmp_path):
    runs = {  # (replicas, router) -> (cached tokens, tokens/s, requests/s)
        (1, sb.PREFIX_ROUTER): (1000, 50.0, 6.0),
        (2, sb.PREFIX_ROUTER): (950, 90.0, 8.0), (2, sb.DEFAULT_ROUTER): (400, 60.0, 4.0),
        (2, sb.ROUND_ROBIN_ROUTER): (300, 55.0, 5.0),
    }
    lens = []

    def fake_run(cfg, router, w, target):
        lens.append(cfg["models"][0]["max_model_len"])
        cached, tps, rps = runs[(cfg["models"][0]["num_replicas"], router)]
        return {"cached_tokens": cached, "tokens_per_s": tps, "requests_per_s": rps, "ttft_p99_ms": 10.0}

    monkeypatch.setattr(sb, "_run_once", fake_run)
    out = sb.compare_routers("/ckpt", 1, 2, [2], sb.Workload(), target=None, out=str(tmp_path))
    assert lens == [2048] * 4   # the old workload fits the old max_model_len
    r2 = out["by_replicas"]["R=2"]
    assert (r2["prefix_router"]["requests_vs_default"], r2["round_robin"]["requests_vs_default"]) == (2.0, 1.25)
    assert out["ideal_single_replica"]["cached_tokens"] == 1000
    assert (r2["prefix_router"]["hit_rate_vs_ideal"], r2["default_router"]["hit_rate_vs_ideal"]) == (0.95, 0.4)
    assert (r2["prefix_router"]["throughput_vs_default"], r2["default_router"]["throughput_vs_default"]) == (1.5, 1.0)
    assert (tmp_path / "routers.png").stat().st_size > 0 and out["png"].endswith("routers.png")


def test_compare_routers_sizes_max_model_len_for_long_documents(monkeypatch, tmp_path):
    lens = []

    def fake_run(cfg, router, w, target):
        lens.append(cfg["models"][0]["max_model_len"])
        return {"cached_tokens": 10, "tokens_per_s": 1.0, "requests_per_s": 1.0, "ttft_p99_ms": 1.0}

    monkeypatch.setattr(sb, "_run_once", fake_run)
    w = sb.Workload(system_tokens=64, session_tokens=3072, user_tokens=32, max_tokens=8, turns=6)
    sb.compare_routers("/ckpt", 1, 2, [2], w, target=None, out=str(tmp_path))
    assert lens == [64 + 3072 + 6 * 32 + 6 * 8] * 4


def test_run_once_keeps_every_turn_and_undeploys(monkeypatch):
    from tests.test_serve_bench import FakeTarget

    deployed = []
    monkeypatch.setattr(sb, "_deploy", lambda cfg, router: deployed.append(router))
    monkeypatch.setattr(sb, "_undeploy", lambda: deployed.append("gone"))

    class Target(FakeTarget):
        def model_info(self):
            return type("Info", (), {"vocab_size": 500})()

    w = sb.Workload(sessions=2, turns=3, system_tokens=8, session_tokens=32, user_tokens=4, max_tokens=2,
                    think_s=0.0)
    out = sb._run_once({}, sb.PREFIX_ROUTER, w, Target())
    assert deployed == [sb.PREFIX_ROUTER, "gone"]
    assert [row[:2] for row in out["per_turn"]] == [[s, t] for s in range(2) for t in range(3)]
    assert [row[3] for row in out["per_turn"]] == [8 + 32 + 4, 8 + 32 + 10, 8 + 32 + 16] * 2
    assert out["cached_tokens"] == sum(row[4] for row in out["per_turn"]) and out["followups_cold"] == 0
