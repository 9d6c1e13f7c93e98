"""ReplicaMetrics: the bookkeeping on its own, then the real export path (a local Ray, scraped over HTTP)."""
from __future__ import annotations

import os
import re
import socket
import time
import urllib.request

import pytest

import cluster.metrics as cm
from cluster.metrics import ReplicaMetrics
from tests.fakes import engine_stats
from cluster.ray_node_start import start_with_retry


class Recorder:
    """Stands in for a ray.util.metrics object: remembers what was recorded, per call."""

    def __init__(self):
        self.calls = []

    def inc(self, value=1.0, tags=None):
        self.calls.append(("inc", value, dict(tags)))

    def set(self, value, tags=None):
        self.calls.append(("set", value, dict(tags)))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, dict(tags)))

    def total(self):
        return sum(c[1] for c in self.calls)


@pytest.fixture
def recorders(monkeypatch):
    fakes = {k: Recorder() for k in cm._get_metrics()}
    monkeypatch.setattr(cm, "_metrics", fakes)
    return fakes


def test_engine_counters_become_increments(recorders):
    m = ReplicaMetrics("llama", "r1")
    m.update_engine(engine_stats(num_running=3, num_waiting=2, kv_blocks_free=40, prompt_tokens=100,
                          generation_tokens=10, prefix_cache_hit_tokens=32))
    m.update_engine(engine_stats(num_running=1, num_waiting=0, kv_blocks_free=90, prompt_tokens=150,
                          generation_tokens=30, prefix_cache_hit_tokens=32))
    assert recorders["prompt_tokens"].total() == 150
    assert recorders["generation_tokens"].total() == 30
    assert recorders["hit_tokens"].total() == 32          # no growth, no second increment
    assert len(recorders["hit_tokens"].calls) == 1
    assert recorders["queue"].calls[-1][1] == 0 and recorders["running"].calls[-1][1] == 1
    assert recorders["kv_used"].calls[-1][1] == 10 and recorders["kv_free"].calls[-1][1] == 90
    # The engine restarted (counters went down): its new value is all growth.
    m.update_engine(engine_stats(prompt_tokens=20))
    assert recorders["prompt_tokens"].total() == 170
    # on_finish does not count tokens a second time when the engine is the source.
    m.on_finish(prompt_tokens=5, completion_tokens=5, cached_tokens=5)
    assert recorders["prompt_tokens"].total() == 170
    assert all(c[2] == {"model": "llama", "replica": "r1"} for c in recorders["prompt_tokens"].calls)
    # vLLM's names carry the same numbers, tagged model_name.
    assert recorders["vllm_prompt_tokens"].total() == 170 and recorders["vllm_generation_tokens"].total() == 30
    assert recorders["vllm_prefix_queries"].total() == 170 and recorders["vllm_prefix_hits"].total() == 32
    assert recorders["vllm_running"].calls[-1][1] == 0 and recorders["vllm_waiting"].calls[-1][1] == 0
    assert recorders["vllm_kv_usage"].calls[1][1] == pytest.approx(10 / 100)
    assert all(c[2] == {"model_name": "llama", "replica": "r1"} for c in recorders["vllm_prompt_tokens"].calls)


def test_prefix_cache_queries_only_with_prefix_caching(recorders):
    m = ReplicaMetrics("llama", "r1", prefix_caching=False)
    m.update_engine(engine_stats(prompt_tokens=64, kv_blocks_total=0, kv_blocks_free=0))
    assert recorders["vllm_prompt_tokens"].total() == 64
    assert recorders["vllm_prefix_queries"].total() == 0
    assert recorders["vllm_kv_usage"].calls[-1][1] == 0.0      # no blocks: 0, not a division by zero


def test_router_metrics(monkeypatch):
    fakes = {k: Recorder() for k in cm._get_router_metrics()}
    monkeypatch.setattr(cm, "_router_metrics", fakes)
    r = cm.RouterMetrics("llama")
    r.on_decision("affinity", prompt_blocks=4, matched_blocks=3)
    r.on_decision("fallback", prompt_blocks=2, matched_blocks=0)
    r.on_report_age("replica-1", 1.5)
    assert fakes["decisions"].calls == [("inc", 1, {"model": "llama", "reason": "affinity"}),
                                        ("inc", 1, {"model": "llama", "reason": "fallback"})]
    assert fakes["prompt_blocks"].total() == 6 and fakes["matched_blocks"].total() == 3
    assert fakes["report_age"].calls == [("set", 1.5, {"model": "llama", "replica": "replica-1"})]


def test_request_sourced_tokens_and_request_path(recorders):
    m = ReplicaMetrics("llama", "r2", token_source="requests")
    m.on_request()
    m.on_first_token(0.25)
    m.on_token(0.02)
    m.on_token(0.09, num_tokens=3)
    m.on_finish(prompt_tokens=40, completion_tokens=4, cached_tokens=32, e2e_seconds=0.4)
    m.on_error("RESOURCE_EXHAUSTED")
    m.update_engine(engine_stats(prompt_tokens=999))             # gauges only
    assert recorders["requests"].total() == 1
    assert [c[1] for c in recorders["ttft"].calls] == [0.25]
    assert [c[1] for c in recorders["itl"].calls] == pytest.approx([0.02, 0.03, 0.03, 0.03])
    assert (recorders["prompt_tokens"].total(), recorders["generation_tokens"].total(),
            recorders["hit_tokens"].total()) == (40, 4, 32)
    assert [c[1] for c in recorders["vllm_ttft"].calls] == [0.25]
    assert [c[1] for c in recorders["vllm_e2e"].calls] == [0.4]
    assert recorders["vllm_prompt_tokens"].total() == 40 and recorders["vllm_prefix_hits"].total() == 32
    assert recorders["errors"].calls == [("inc", 1, {"model": "llama", "replica": "r2",
                                                      "code": "RESOURCE_EXHAUSTED"})]
    with pytest.raises(ValueError):
        ReplicaMetrics("llama", "r3", token_source="both")


# ---- the real export path ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXPECTED = [
    "ray_herd_requests_total", "ray_herd_request_errors_total", "ray_herd_time_to_first_token_seconds_bucket",
    "ray_herd_inter_token_latency_seconds_bucket", "ray_herd_queue_depth", "ray_herd_running_sequences",
    "ray_herd_kv_blocks_used", "ray_herd_kv_blocks_free", "ray_herd_prefix_cache_hit_tokens_total",
    "ray_herd_prompt_tokens_total", "ray_herd_generation_tokens_total",
]


def _series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


@pytest.mark.slow
def test_metrics_are_exported_with_model_and_replica_tags():
    import ray

    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    ports = []

    def start():  # a new metrics port each try: a port taken meanwhile keeps the node from starting
        ports.append(_free_port())
        ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _metrics_export_port=ports[-1], log_to_driver=False)

    start_with_retry(start)
    port = ports[-1]
    try:
        @ray.remote(num_cpus=0)
        class Replica:
            def serve_some(self):
                from types import SimpleNamespace  # (nothing from this test module: workers cannot import it)

                from cluster.metrics import ReplicaMetrics

                m = ReplicaMetrics("tiny-llama", "replica-7")
                m.on_request()
                m.on_first_token(0.12)
                m.on_token(0.01)
                m.on_error("INVALID_ARGUMENT")
                m.update_engine(SimpleNamespace(num_running=2, num_waiting=1, kv_blocks_total=64,
                                                kv_blocks_free=48, prefix_cache_hit_tokens=16, prompt_tokens=40,
                                                generation_tokens=8))
                return True

        replica = Replica.remote()
        assert ray.get(replica.serve_some.remote())

        deadline, text, missing = time.monotonic() + 45, "", EXPECTED
        while time.monotonic() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            except OSError:
                text = ""
            missing = [n for n in EXPECTED if not _series(text, n)]
            if not missing:
                break
            time.sleep(1.0)
        assert not missing, f"not exported within 45 s: {missing}"

        for name in EXPECTED:
            for line in _series(text, name):
                assert 'model="tiny-llama"' in line and 'replica="replica-7"' in line, line
        assert 'code="INVALID_ARGUMENT"' in _series(text, "ray_herd_request_errors_total")[0]

        def value(name):
            return float(_series(text, name)[0].rsplit(" ", 1)[1])

        assert value("ray_herd_prompt_tokens_total") == 40
        assert value("ray_herd_kv_blocks_used") == 16 and value("ray_herd_queue_depth") == 1
        ttft_inf = [ln for ln in _series(text, "ray_herd_time_to_first_token_seconds_bucket") if 'le="+Inf"' in ln]
        assert re.search(r" 1(\.0)?$", ttft_inf[0])
    finally:
        ray.shutdown()


# ---- a real herd serve: known traffic in, the vLLM-named series out -------------------------------------------
# Four prompts of known sizes (token ids, so their lengths are exact); the fourth repeats the third, which the
# router sends back to the replica that holds it (affinity) and whose prefix cache then serves its 2 full blocks.
BLOCK = 16
PROMPTS = [list(range(100, 120)), list(range(200, 237)), list(range(300, 340)), list(range(300, 340))]
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.serve_fixtures import running_herd_cluster
    from workers.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("metrics-ckpt") / "m", "llama32-1b-mini", dtype="float32")
    config = {"models": [{"name": "tiny", "path": str(path), "num_replicas": 2, "max_model_len": 128,
                          "resources_per_shard": {"CPU": 0.25}, "kv_cache_memory": 4 << 20}]}
    with running_herd_cluster(config, num_cpus=3) as c:
        yield c


@pytest.mark.slow
def test_vllm_named_series_after_known_traffic(served):
    from cluster.client import HerdClient, collect
    from cluster.status import metrics_urls, present, scrape, total

    usages = []
    with HerdClient(served.grpc_address) as client:
        for ids in PROMPTS:
            _, _, last = collect(client.generate("tiny", ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                                                 timeout=120))
            usages.append(last.usage)
    assert [u.prompt_tokens for u in usages] == [len(p) for p in PROMPTS]
    assert usages[3].cached_tokens == 2 * BLOCK          # the repeat found its blocks where the router sent it

    prompt_total = sum(len(p) for p in PROMPTS)
    generated_total = MAX_TOKENS * len(PROMPTS)
    hits_total = sum(u.cached_tokens for u in usages)
    model = {"model_name": "tiny"}
    expected = {
        "ray_vllm_prompt_tokens_total": prompt_total,
        "ray_vllm_generation_tokens_total": generated_total,
        "ray_vllm_prefix_cache_queries_total": prompt_total,
        "ray_vllm_prefix_cache_hits_total": hits_total,
        "ray_vllm_time_to_first_token_seconds_count": len(PROMPTS),
        "ray_vllm_e2e_request_latency_seconds_count": len(PROMPTS),
        "ray_vllm_inter_token_latency_seconds_count": (MAX_TOKENS - 1) * len(PROMPTS),
    }
    router = {"model": "tiny"}
    expected_router = {("ray_herd_router_decisions_total", "fallback"): 3,
                       ("ray_herd_router_decisions_total", "affinity"): 1}

    def current():
        samples = scrape(metrics_urls())
        got = {name: total(samples, name, **model) for name in expected}
        got.update({key: total(samples, key[0], reason=key[1], **router) for key in expected_router})
        return samples, got

    deadline, samples, got = time.monotonic() + 60, [], {}
    while time.monotonic() < deadline:
        samples, got = current()
        if all(got[k] == v for k, v in expected.items()) and all(got[k] == v for k, v in expected_router.items()):
            break
        time.sleep(1.0)
    assert {k: got[k] for k in expected} == expected
    assert {k: got[k] for k in expected_router} == expected_router
    # Router: 1+2+2+2 full prompt blocks routed, the repeat's 2 known to be held where it went.
    assert total(samples, "ray_herd_router_prompt_blocks_total", **router) == 7
    assert total(samples, "ray_herd_router_matched_blocks_total", **router) == 2
    # Gauges: both replicas report, nothing running or waiting, every block free again (cached ones count free).
    for gauge in ("ray_vllm_num_requests_running", "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc"):
        series = [s for s in samples if s.name == gauge and s.labels.get("model_name") == "tiny"]
        assert len({s.labels["replica"] for s in series}) == 2, gauge
        assert all(s.value == 0 for s in series), series
    # herd's own names carry the same numbers.
    assert total(samples, "ray_herd_prompt_tokens_total", model="tiny") == prompt_total
    # No ':' name anywhere: Ray would have dropped it (module doc of cluster.metrics).
    assert not any(":" in s.name for s in samples)

    # The router's report-age gauge is set at a decision made with a replica's routing report in hand. Reports
    # come every routing_stats_period_s (2 s), so the four requests above, sent as soon as the cluster ran, may
    # all have been routed before the first arrived (seen once in a full `make test`). Later requests have one.
    from tests.serve_fixtures import wait_for

    def report_age_exported() -> bool:
        with HerdClient(served.grpc_address) as client:
            collect(client.generate("tiny", [7] * 20, max_tokens=1, temperature=0.0, timeout=120))
        return present(scrape(metrics_urls()), "ray_herd_router_report_age_seconds", **router)
    wait_for(report_age_exported, timeout_s=90, interval_s=1.0)
