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
    fakes = {k: Recorder() for k in ("requests", "errors", "ttft", "itl", "queue", "running", "kv_used",
                                     "kv_free", "hit_tokens", "prompt_tokens", "generation_tokens")}
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


def test_request_sourced_tokens_and_request_path(recorders):
    m = ReplicaMetrics("llama", "r2", token_source="requests")
    m.on_request()
    m.on_first_token(0.25)
    m.on_token(0.02)
    m.on_token(0.09, num_tokens=3)
    m.on_finish(prompt_tokens=40, completion_tokens=4, cached_tokens=32)
    m.on_error("RESOURCE_EXHAUSTED")
    m.update_engine(engine_stats(prompt_tokens=999))             # gauges only
    assert recorders["requests"].total() == 1
    assert [c[1] for c in recorders["ttft"].calls] == [0.25]
    assert [c[1] for c in recorders["itl"].calls] == pytest.approx([0.02, 0.03, 0.03, 0.03])
    assert (recorders["prompt_tokens"].total(), recorders["generation_tokens"].total(),
            recorders["hit_tokens"].total()) == (40, 4, 32)
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
    port = _free_port()
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", _metrics_export_port=port,
             log_to_driver=False)
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
