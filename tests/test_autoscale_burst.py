"""Replicas come and go under load and no request is lost (real Ray + Serve + gRPC on 127.0.0.1): a burst of
gRPC requests scales an autoscaled model up, and it scales back down once the burst is over; a redeploy with
a changed config replaces the replicas while streams are open, and with `max_surge_percent` the model and the
ingress each keep a running replica throughout it.

The burst: The model keeps herd's defaults (its
target of ongoing requests, every hop's capacity, how often load is reported) but a short downscale delay, so
the test does not wait a minute for the scale-down: the burst must reach the replicas for the autoscaler to see it.

The burst's clients send requests back to back until the second replica is RUNNING, so the load lasts until
the autoscaler has acted on any machine. A burst of single long requests did not: its streams took 28 s on one
run and 85 s on another of the same machine, and in the first they had all ended before the replica came."""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from tests.serve_fixtures import running_herd_cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
MODEL = "tiny"
KV_CACHE_MEMORY = 128 << 20
BURST = 48
REQUEST_TOKENS = 300       # one request of a burst client: seconds on 2 vCPUs, beside 47 others
SCALE_UP_DEADLINE_S = 120  # a guard against a hang, not a timing


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("burst"), "tiny", LLAMA2_MHA)
    config = {"models": [{
        "name": MODEL, "path": str(path), "dtype": "float32", "resources_per_shard": {"CPU": 0.25},
        "max_model_len": 2048, "kv_cache_memory": KV_CACHE_MEMORY, "graceful_shutdown_timeout_s": 60,
        "max_surge_percent": 100,   # the redeploy starts the new replica before it stops the old one
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "downscale_delay_s": 4}}]}
    with running_herd_cluster(config, num_cpus=4) as c:
        yield c


def running_replicas(deployment: str = "") -> int:
    from ray import serve

    from cluster.app import APP_NAME, deployment_name
    app = serve.status().applications[APP_NAME]
    return app.deployments[deployment or deployment_name(MODEL)].replica_states.get("RUNNING", 0)


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


def test_a_redeploy_under_load_finishes_every_open_stream_and_drops_no_request(cluster):
    """The config changes while 32 streams are open (the model's KV pool and length, so Serve starts new replicas of it
    and of the ingress, whose arguments hold the config): the old replicas take no new work and finish their
    streams; requests sent meanwhile are served, by old replicas or new ones. With max_surge_percent (the
    model's 100 here, the ingress's 100 by default) the new replica runs before the old one stops: a running
    replica of each deployment all along, as Serve's own replica states say."""
    from ray import serve

    from cluster.app import APP_NAME, INGRESS_NAME, build_app, deployment_name
    from cluster.client import HerdClient, collect
    from cluster.config import ClusterConfig

    client = HerdClient(cluster.grpc_address)
    before = cluster.model_stats(MODEL)

    def stream(i: int) -> str:
        try:
            return collect(client.generate(MODEL, [7 + i, 8, 9, 10], max_tokens=200, temperature=0.0,
                                           ignore_eos=True, timeout=300))[2].finish_reason
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    probes, redeployed = collections.Counter(), threading.Event()

    def probe() -> None:   # requests one after another, from before the redeploy to after it
        for i in range(100, 10_000):
            if redeployed.is_set():
                return
            probes[stream(i)] += 1

    def first_tokens_flowing() -> bool:
        return cluster.model_stats(MODEL)["generation_tokens"] > before["generation_tokens"] + 32

    fewest_running = {deployment_name(MODEL): 2, INGRESS_NAME: 2}

    def watch_running() -> None:   # Serve's replica states, from before the redeploy until it is over
        while not redeployed.is_set():
            for deployment in fewest_running:
                fewest_running[deployment] = min(fewest_running[deployment], running_replicas(deployment))
            time.sleep(0.1)

    # Built before the load: Serve's validation of a router config registers and unregisters its module with
    # cloudpickle, process-wide, and so does this process's handle thread when a config update arrives under
    # load (the autoscaler's); the two at once fail ("cluster.routing is not registered for pickle by value").
    model = {**cluster.config["models"][0], "kv_cache_memory": KV_CACHE_MEMORY // 2, "max_model_len": 1024}
    app = build_app(ClusterConfig.from_dict({**cluster.config, "models": [model]}))
    with ThreadPoolExecutor(max_workers=34) as pool:
        try:
            streams = [pool.submit(stream, i) for i in range(32)]
            prober = pool.submit(probe)
            wait_for(first_tokens_flowing, timeout_s=120)
            watcher = pool.submit(watch_running)
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
            wait_for(lambda: serve.status().applications[APP_NAME].status == "RUNNING" and
                     cluster.model_stats(MODEL)["replica_id"] != before["replica_id"], timeout_s=180, interval_s=0.5)
            reasons = collections.Counter(f.result() for f in streams)
        finally:   # the prober and the watcher end whatever failed (the pool waits for them)
            redeployed.set()
        prober.result()
        watcher.result()
    after = cluster.model_stats(MODEL)
    assert reasons == {"length": 32}, reasons            # every open stream got all its tokens
    assert set(probes) == {"length"} and probes["length"] >= 2, probes   # nothing refused or broken meanwhile
    assert after["kv_blocks_total"] < before["kv_blocks_total"]   # the new config's replica is the one serving now
    assert min(fewest_running.values()) >= 1, fewest_running   # (Serve's default, no surge: 0 while replaced)
    # The new ingress ran before the new model replica did, and says the new replica's max_model_len, not the old
    # one's it could first ask (cluster.ingress.Frontend.info).
    assert [m.max_model_len for m in client.list_models(timeout=30).models] == [1024]
    assert stream(0) == "length"
