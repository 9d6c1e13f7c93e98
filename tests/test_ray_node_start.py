"""cluster/ray_node_start.py: a node-start timeout is retried once, after the failed start's processes are ended."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.ray_node_start import start_with_retry
from tests.serve_fixtures import process_running

TIMEOUT = "The current node timed out during startup. This could happen because some of the raylet failed"


def test_a_start_that_times_out_is_retried_and_its_processes_are_ended():
    started: list[subprocess.Popen] = []

    def start():
        # stands in for the GCS / raylet a failed ray.init leaves running
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]))
        if len(started) == 1:
            raise Exception(TIMEOUT)

    start_with_retry(start)
    try:
        assert len(started) == 2
        started[0].wait(timeout=15)              # reaped here: the helper ended it
        assert not process_running(started[0].pid)
        assert started[1].poll() is None         # the successful start's processes are kept
    finally:
        for p in started:
            p.kill()
            p.wait()


def test_a_gcs_that_does_not_publish_its_port_is_a_startup_failure():
    from cluster.ray_node_start import is_startup_failure

    assert is_startup_failure(RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab12"))
    assert not is_startup_failure(RuntimeError("Failed to bind to address '127.0.0.1:9000'."))


def test_other_errors_and_a_second_timeout_are_raised():
    calls = []

    def bad_options():
        calls.append(1)
        raise ValueError("System config parameters can only be set on the head node.")

    with pytest.raises(ValueError):
        start_with_retry(bad_options)
    assert len(calls) == 1

    def always_times_out():
        calls.append(1)
        raise Exception(TIMEOUT)

    with pytest.raises(Exception, match="timed out during startup"):
        start_with_retry(always_times_out)
    assert len(calls) == 3


def test_start_local_ray_starts_its_node_again_after_a_gcs_timeout(monkeypatch, caplog):
    """herd serve's and the benchmarks' start (cluster.local_ray) goes through the retry, with its options
    each time, and says so."""
    import ray

    import cluster.background_priority
    from cluster.local_ray import start_local_ray

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise RuntimeError("Timed out waiting for file /tmp/ray/session_x/gcs_server_port_ab12")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(cluster.background_priority, "lower_background_priority", lambda: None)
    with caplog.at_level("WARNING", logger="herd.cluster.ray_node_start"):
        start_local_ray(num_cpus=2, include_dashboard=False)
    assert len(calls) == 2 and calls[0] == calls[1]
    assert calls[1]["address"] == "local" and calls[1]["_node_ip_address"] == "127.0.0.1"
    assert "did not start" in caplog.text and "gcs_server_port" in caplog.text
