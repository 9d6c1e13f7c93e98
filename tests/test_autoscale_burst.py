"""A burst of gRPC requests scales an autoscaled model up, and it scales back down once the burst is over,
with every request answered (real Ray + Serve + gRPC on 127.0.0.1). The model keeps herd's defaults (its
target of ongoing requests, every hop's capacity, how often load is reported) but a short downscale delay, so
the test does not wait a minute for the scale-down: the burst must reach the replicas for the autoscaler to see it.

The burst's clients send requests back to back until the second replica is RUNNING, so the load lasts until
the autoscaler has acted on any machine. A burst of single long requests did not: its streams took 28 s on one
run and 85 s on another of the same machine, and in the first they had all ended before the replica came."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from tests.serve_fixtures import running_herd_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
MODEL = "tiny"
BURST = 48
REQUEST_TOKENS = 300       # one request of a burst client: seconds on 2 vCPUs, beside 47 others
SCALE_UP_DEADLINE_S = 120  # a guard against a hang, not a timing


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("burst"), "tiny", LLAMA2_MHA)
    config = {"models": [{
        "name": MODEL, "path": str(path), "dtype": "float32", "resources_per_shard": {"CPU": 0.25},
        "max_model_len": 2048, "kv_cache_memory": 128 << 20, "graceful_shutdown_timeout_s": 60,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "downscale_delay_s": 4}}]}
    with running_herd_cluster(config, num_cpus=4) as c:
        yield c


def running_replicas() -> int:
    from ray import serve

    from cluster.app import APP_NAME, deployment_name
    app = serve.status().applications[APP_NAME]
    return app.deployments[deployment_name(MODEL)].replica_states.get("RUNNING", 0)


def test_burst_scales_up_and_back_down_without_failures(cluster):
    from cluster.client import HerdClient

    client = HerdClient(cluster.grpc_address)
    assert running_replicas() == 1
    seen, stop, scaled = [], threading.Event(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(running_replicas())
            if seen[-1] >= 2:
                scaled.set()
            time.sleep(0.25)

    def one(i: int) -> str:
        responses = list(client.generate(MODEL, [5 + i % 50] * 40, timeout=300, max_tokens=REQUEST_TOKENS,
                                         temperature=0.0, ignore_eos=True))
        return responses[-1].finish_reason

    def burst_client(i: int) -> list[str]:
        """Requests back to back until the second replica is up (the deadline only guards against a hang)."""
        reasons, deadline = [], time.monotonic() + SCALE_UP_DEADLINE_S
        while not scaled.is_set() and time.monotonic() < deadline:
            reasons.append(one(i))
        return reasons

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=BURST) as pool:
            started = time.monotonic()
            futures = [pool.submit(burst_client, i) for i in range(BURST)]
            scaled.wait(timeout=SCALE_UP_DEADLINE_S)
            scaled_within_s = time.monotonic() - started
            results = [f.result() for f in futures]
        print(f"second replica RUNNING {scaled_within_s:.1f} s after the burst began; "
              f"{sum(map(len, results))} requests")
        assert scaled.is_set(), f"never scaled up: {seen[-20:]}"
        reasons = [r for client_reasons in results for r in client_reasons]
        assert all(results) and all(r == "length" for r in reasons), set(reasons)   # zero failed requests
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and running_replicas() > 1:
            time.sleep(0.5)
        assert running_replicas() == 1, "did not scale back down after the burst"
        assert one(0) == "length"  # and it still serves
    finally:
        stop.set()
        watcher.join(timeout=5)
