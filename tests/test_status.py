"""`herd status` against a real local herd cluster: a TP2 shard-group model and a whole-model one, some traffic,
then the screen (in process, and as an operator runs it: `herd status --address` in another process)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster.status import ClusterStatus, ModelStatus, ReplicaStatus, RouterStatus, ShardStatus, format_status

pytestmark = pytest.mark.slow
PROMPT = list(range(100, 148))   # 3 blocks of 16


def test_format_status_without_a_cluster():
    """The screen from a status object alone: aggregates, placement lines, what is unknown shows as '-'."""
    shards = [ShardStatus(0, 0, 0, "10.0.0.1", {"GPU": 1.0}), ShardStatus(1, 1, 0, "10.0.0.1", {"GPU": 1.0}),
              ShardStatus(2, 0, 1, "10.0.0.2", {"GPU": 1.0}), ShardStatus(3, 1, 1, "10.0.0.2", {"GPU": 1.0})]
    big = ModelStatus("llama-70b", "model-llama-70b", "HEALTHY", 2, 2, [ReplicaStatus(
        "r1", "RUNNING", "10.0.0.1", 11, running=3, waiting=1, kv_blocks_used=25, kv_blocks_free=75,
        prompt_tokens=200, hit_tokens=50, reported=True, shards=shards)],
        router=RouterStatus({"affinity": 7, "fallback": 3}, prompt_blocks=40, matched_blocks=30, report_age_s=1.25))
    small = ModelStatus("llama-1b", "model-llama-1b", "UPDATING", replicas=[
        ReplicaStatus("r2", "RUNNING", "10.0.0.3", 12, kv_blocks_used=10, kv_blocks_free=10, reported=True),
        ReplicaStatus("r3", "STARTING", "10.0.0.3", None)],
        message="1 replicas that have taken more than 30s to be scheduled. Resources required for each replica: "
                '{"CPU": 1}, total resources available: {"CPU": 0.05}.')
    text = format_status(ClusterStatus("RUNNING", "", [big, small], "10.0.0.1:9000", "http://10.0.0.1:8000/v1",
                                       None, ["http://10.0.0.1:8080/metrics"]))
    assert "dashboard  not running" in text and "metrics    http://10.0.0.1:8080/metrics" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("llama-70b"))
    assert row.split() == ["llama-70b", "HEALTHY", "TP2xPP2", "1/1", "3", "1", "25.0%", "25.0%"]
    row = next(ln for ln in text.splitlines() if ln.startswith("llama-1b"))
    assert row.split() == ["llama-1b", "UPDATING", "TP1xPP1", "1/2", "0", "0", "50.0%", "-"]
    assert "node 10.0.0.1: 2 shard(s) [pp0/tp0, pp0/tp1], each GPU 1" in text
    assert ("  router: 7 affinity, 0 load, 3 fallback; prompt blocks found where sent 75.0%; "
            "oldest replica report 1.2s") in text.splitlines()
    assert text.count("  router:") == 1     # a model nothing was routed to yet has no router line
    assert "node 10.0.0.2: 2 shard(s) [pp1/tp0, pp1/tp1], each GPU 1" in text
    # Serve's message on a model that is not HEALTHY, right under its row (a healthy one's is left out).
    lines = text.splitlines()
    assert lines[lines.index(row) + 1] == f"  serve: {small.message}"
    assert text.count("  serve:") == 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.serve_fixtures import running_herd_cluster
    from workers.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("status-ckpt")
    big = write_demo_checkpoint(root / "big", "llama3-8b-mini", dtype="float32")
    small = write_demo_checkpoint(root / "small", "llama32-1b-mini", dtype="float32")
    common = {"resources_per_shard": {"CPU": 0.25}, "kv_cache_memory": 4 << 20, "max_model_len": 128}
    config = {"models": [{"name": "big", "path": str(big), "tensor_parallel_size": 2, **common},
                         {"name": "small", "path": str(small), **common}]}
    with running_herd_cluster(config, num_cpus=3) as c:
        yield c


def test_status_of_a_running_cluster(served):
    from cluster.client import HerdClient, collect
    from cluster.status import collect_status

    with HerdClient(served.grpc_address) as client:
        cached = [collect(client.generate("big", PROMPT, max_tokens=2, temperature=0.0, ignore_eos=True,
                                          timeout=120))[2].usage.cached_tokens for _ in range(2)]
    assert cached[0] == 0 and cached[1] > 0   # the second time, its leading blocks come from the prefix cache

    deadline = time.monotonic() + 60
    while True:   # the engine gauges reach the metrics endpoint every few seconds
        st = collect_status()
        big = next(m for m in st.models if m.name == "big")
        routed = sum(big.router.decisions.values()) if big.router is not None else 0
        # Both requests in the gauges (a push between the two shows a hit rate of the first one alone).
        counted = bool(big.replicas) and big.replicas[0].prompt_tokens == 2 * len(PROMPT)
        # ... and a push after the second one ended: one taken while it still ran counts its prompt as running.
        idle = (big.running, big.waiting) == (0, 0)
        if (big.prefix_hit_rate is not None and counted and idle and routed == 2) or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert st.app_status == "RUNNING" and st.grpc_address == served.grpc_address
    assert st.http_url == served.http_url + "/v1" and st.dashboard_url is None and st.metrics_urls
    assert {m.name for m in st.models} == {"big", "small"}
    assert (big.tensor_parallel_size, big.pipeline_parallel_size) == (2, 1)
    [replica] = big.replicas
    assert replica.state == "RUNNING" and replica.node_ip == "127.0.0.1" and replica.pid
    assert [(s.tp_rank, s.pp_rank, s.node_ip) for s in replica.shards] == [(0, 0, "127.0.0.1"), (1, 0, "127.0.0.1")]
    assert all(s.resources == {"CPU": 0.25} for s in replica.shards)
    assert replica.reported and replica.kv_blocks_used + replica.kv_blocks_free > 0
    assert replica.prompt_tokens == 2 * len(PROMPT) and replica.hit_tokens == cached[1]
    assert big.prefix_hit_rate == pytest.approx(cached[1] / (2 * len(PROMPT)))
    assert (big.running, big.waiting) == (0, 0)
    small = next(m for m in st.models if m.name == "small")
    assert small.replicas[0].shards == [] and small.prefix_hit_rate is None and small.router is None
    # One replica: the first request had nowhere cached (fallback), the second went where its blocks were.
    assert big.router.decisions == {"fallback": 1, "affinity": 1} and big.router.prompt_blocks == 6
    assert big.router.report_age_s is not None

    text = format_status(st)
    assert "big" in text and "TP2xPP1" in text and f"{100 * big.prefix_hit_rate:.1f}%" in text
    assert "node 127.0.0.1: 2 shard(s) [pp0/tp0, pp0/tp1], each CPU 0.25" in text


def test_herd_status_command_from_another_process(served):
    """What an operator runs: a new driver joins the cluster by its address (token auth included)."""
    import ray

    address = ray._private.worker._global_node.gcs_address
    env = {**os.environ, "RAY_ENABLE_AUTO_CONNECT": "0"}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", address], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert " INFO " not in out.stderr, out.stderr[-3000:]   # Serve's handle set-up lines stay off the screen
    lines = out.stdout.splitlines()
    assert lines[0] == "herd: application herd RUNNING"
    assert f"  gRPC       {served.grpc_address}" in lines
    assert any(ln.startswith("big ") and "TP2xPP1" in ln and "1/1" in ln for ln in lines), out.stdout
    assert any(ln.startswith("small ") and "TP1xPP1" in ln for ln in lines), out.stdout
    assert "node 127.0.0.1: 2 shard(s)" in out.stdout
