"""A burst of gRPC requests scales an autoscaled model up, and it scales back down once the burst is over,
with every request answered (real Ray + Serve + gRPC on 127.0.0.1)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from tests.serve_fixtures import start_herd_cluster, stop_herd_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
MODEL = "tiny"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("burst"), "tiny", LLAMA2_MHA)
    config = {"models": [{
        "name": MODEL, "path": str(path), "dtype": "float32", "resources_per_shard": {"CPU": 0.25},
        "max_model_len": 512, "kv_cache_memory": 16 << 20, "max_ongoing_requests": 8,
        "graceful_shutdown_timeout_s": 60,
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                               "upscale_delay_s": 0.5, "downscale_delay_s": 4, "metrics_interval_s": 0.5,
                               "look_back_period_s": 1.0}}]}
    c = start_herd_cluster(config, num_cpus=4)
    yield c
    stop_herd_cluster()


def running_replicas() -> int:
    from ray import serve

    from cluster.app import APP_NAME, deployment_name
    app = serve.status().applications[APP_NAME]
    return app.deployments[deployment_name(MODEL)].replica_states.get("RUNNING", 0)


def test_burst_scales_up_and_back_down_without_failures(cluster):
    from cluster.client import HerdClient

    client = HerdClient(cluster.grpc_address)
    assert running_replicas() == 1
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(running_replicas())
            time.sleep(0.25)

    def one(i: int) -> str:
        responses = list(client.generate(MODEL, [5 + i % 50] * 40, timeout=120, max_tokens=48, temperature=0.0,
                                         ignore_eos=True))
        return responses[-1].finish_reason

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            deadline = time.monotonic() + 120
            results = []
            # keep the burst going until the second replica is up (and has served part of it)
            while time.monotonic() < deadline:
                results += list(pool.map(one, range(24)))
                if max(seen, default=0) >= 2:
                    results += list(pool.map(one, range(24)))
                    break
        assert max(seen) >= 2, f"never scaled up: {seen[-20:]}"
        assert results and all(r == "length" for r in results), set(results)   # zero failed requests
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and running_replicas() > 1:
            time.sleep(0.5)
        assert running_replicas() == 1, "did not scale back down after the burst"
        assert one(0) == "length"  # and it still serves
    finally:
        stop.set()
        watcher.join(timeout=5)
