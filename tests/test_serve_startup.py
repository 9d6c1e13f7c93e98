"""`herd serve` as an operator starts it: a short progress, then one summary whose addresses work; Ray's own
INFO lines stay in its log files."""
from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cluster import cpu_binding
from cluster.config import ClusterConfig
from tests.herd_serve_process import start_herd_serve, stop_herd_serve
from tests.serve_fixtures import free_port
from workers.cpu_affinity import parse_cpu_list

pytestmark = pytest.mark.slow


def test_describe_model_and_summary_lines():
    from cluster.config import ClusterConfig
    from cluster.startup import describe_model, summary_lines

    cfg = ClusterConfig.from_dict({"models": [
        {"name": "big", "path": "/m/big", "tensor_parallel_size": 4, "pipeline_parallel_size": 2},
        {"name": "small", "path": "/m/small", "autoscaling_config": {"min_replicas": 1, "max_replicas": 8}},
        {"name": "two", "path": "/m/two", "num_replicas": 2}]})
    assert [describe_model(m) for m in cfg.models] == [
        "big (TP4xPP2 shard group, 1 replica of 8 shards)", "small (autoscaled, 1-8 replicas)", "two (2 replicas)"]
    lines = summary_lines(cfg, elapsed_s=12.34, dashboard_url=None, metrics_urls=["http://h:1/metrics"],
                          logs_dir="/tmp/ray/session_x/logs", joined=False)
    assert lines[0] == "herd: ready in 12.3s"
    assert "  gRPC       127.0.0.1:9000  (herd.v1.Inference, grpc.health.v1.Health)" in lines
    assert "  dashboard  not running" in lines and lines[-1] == "  Ctrl-C stops"
    tls = ClusterConfig.from_dict({**cfg.to_dict(), "tls": {"cert_file": "/c.pem", "key_file": "/k.pem"}})
    local = summary_lines(tls, elapsed_s=1, dashboard_url=None, metrics_urls=[], logs_dir=None, joined=False)
    assert "  gRPC       127.0.0.1:9000  (TLS; herd.v1.Inference, grpc.health.v1.Health)" in local
    assert "  HTTP       https://127.0.0.1:8000/v1  (OpenAI-compatible)" in local
    # A joined cluster's gRPC proxy is started by the cluster, without herd's TLS hook: not claimed.
    joined = summary_lines(tls, elapsed_s=1, dashboard_url=None, metrics_urls=[], logs_dir=None, joined=True)
    assert "  gRPC       127.0.0.1:9000  (herd.v1.Inference, grpc.health.v1.Health)" in joined


def test_a_deploy_failure_is_one_line_per_model_and_no_traceback(monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    from cluster.startup import deploy_failures, failure_reason

    message = ("The deployment failed to start 3 times in a row. This may be due to a problem with its constructor "
               "or initial health check failing. See controller logs for details. Error:\nTraceback (most recent "
               "call last):\n  File \"/work/cluster/deployment.py\", line 203, in __init__\n    self.engine = "
               "load_engine(spec)\nsafetensors_rust.SafetensorError: Error while deserializing header\n")
    assert failure_reason(message) == "safetensors_rust.SafetensorError: Error while deserializing header"
    assert failure_reason("") == "no reason given (see the replicas' logs)"
    deployments = {"model-a": SimpleNamespace(status="DEPLOY_FAILED", message=message),
                   "model-b": SimpleNamespace(status="HEALTHY", message=""),
                   "Ingress": SimpleNamespace(status="UNHEALTHY", message="boom\nValueError: bad")}
    app = SimpleNamespace(status="DEPLOY_FAILED", message="Failed to update the deployments", deployments=deployments)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"herd": app}))
    assert deploy_failures("herd") == ["Ingress: ValueError: bad",
                                       "model a: safetensors_rust.SafetensorError: Error while deserializing header"]
    assert deploy_failures("other") == []
    app.status = "RUNNING"
    assert deploy_failures("herd") == []


SERVE_UNSCHEDULED = ("Deployment 'model-a' in application 'herd' has 1 replicas that have taken more than 30s to be "
                     "scheduled. This may be due to waiting for the cluster to auto-scale or for a runtime environment "
                     "to be installed. Resources required for each replica: {\"CPU\": 0.25, \"GPU\": 1.0}, total "
                     "resources available: {\"CPU\": 1.5}. Use `ray status` for more details.")


def test_replicas_waiting_for_room_are_said_once(monkeypatch):
    """Serve's message for replicas it cannot place becomes one line per model (and the ingress), said when it
    changes: a start or a reload otherwise only looks slow."""
    import io
    from types import SimpleNamespace

    from ray import serve

    from cluster.startup import DeployProgress, waiting_for_resources

    assert waiting_for_resources("Deployment 'model-a' ... has 1 replicas that have taken more than 30s to "
                                 "initialize.") is None
    said = ("1 replica(s) not placed after 30+ s: each needs {\"CPU\": 0.25, \"GPU\": 1.0}, the cluster has "
            "{\"CPU\": 1.5} available (`ray status` shows why; a rolling update's surge needs room too)")
    assert waiting_for_resources(SERVE_UNSCHEDULED) == said
    group = SERVE_UNSCHEDULED.replace('{\"CPU\": 0.25, \"GPU\": 1.0}', '[{\"CPU\": 0.1}, {\"GPU\": 1.0}, {\"GPU\": 1.0}]')
    assert waiting_for_resources(group) == said.replace(
        '{\"CPU\": 0.25, \"GPU\": 1.0}', 'a placement group of [{\"CPU\": 0.1}, {\"GPU\": 1.0}, {\"GPU\": 1.0}]')
    model = SimpleNamespace(status="UPDATING", message=SERVE_UNSCHEDULED, replica_states={"RUNNING": 1, "STARTING": 1})
    ingress = SimpleNamespace(status="HEALTHY", message="", replica_states={"RUNNING": 1})
    app = SimpleNamespace(status="DEPLOYING", deployments={"model-a": model, "Ingress": ingress})
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"herd": app}))
    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/a"}]})
    out = io.StringIO()
    progress = DeployProgress(cfg, "herd", None, out=out)
    progress.poll()
    progress.poll()
    ingress.message = SERVE_UNSCHEDULED.replace("model-a", "Ingress")
    progress.poll()
    assert out.getvalue().splitlines() == ["herd:   a: replicas 1/2 running, 1 starting", f"herd:   a: {said}",
                                           f"herd:   ingress: {said}"]


def test_herd_serve_says_why_a_model_failed_to_deploy(tmp_path):
    """A checkpoint that passes the checks before Ray starts but cannot be loaded (weights cut in half): the
    model's own error in one line, exit 1, no traceback, the cluster shut down."""
    import shutil

    from workers.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "cut", "llama32-1b-mini", dtype="float32")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = tmp_path / "cluster.yaml"
    config.write_text(f"models: [{{name: cut, path: {path}, kv_cache_memory: 4194304}}]\n")
    # One constructor try instead of Serve's three (the controller reads this in its own process): ~20 s saved.
    env = {**os.environ, "RAY_ENABLE_AUTO_CONNECT": "0", "RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT": "1"}
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", str(config), "--grpc-port", str(free_port()),
                          "--http-port", str(free_port())], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "herd: error: model cut: " in out.stderr and "SafetensorError" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "herd: the replicas' logs: " in out.stderr and "herd: shutting down" in out.stderr
    shutil.rmtree(tmp_path / "cut")


def test_herd_serve_start_up_and_summary(tmp_path):
    """A real `herd serve` with TLS configured: its progress and summary, and every address it names answers;
    the gRPC port only over TLS (cluster.grpc_tls), the HTTP port as HTTPS."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.cli import main as herd_main
    from tests.tls_certs import write_self_signed
    from workers.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path / "m", "llama32-1b-mini", dtype="float32")
    cert, key = write_self_signed(tmp_path)
    config = tmp_path / "cluster.yaml"
    config.write_text(f"models:\n  - name: tiny\n    path: {path}\n    max_model_len: {DRAIN_TOKENS + 32}\n"
                      "    resources_per_shard: {CPU: 0.25}\n    kv_cache_memory: 33554432\n"
                      f"cpu_binding_serving_cpus: 1\ntls: {{cert_file: {cert}, key_file: {key}}}\n")
    # One single-replica CPU model: cpu_binding (auto) gives its engine process the top CPU and the rest of the
    # local Ray the others (one at the least, as configured), wherever there are two CPUs or more (CI has two).
    binding = cpu_binding.plan(ClusterConfig.from_yaml(config).models, os.sched_getaffinity(0), serving_cpus=1)
    # Serve says after 2 s (not 30) that a replica waits for room (the reload that cannot finish, below).
    proc, lines, reader, grpc_port, http_port = start_herd_serve(config, env={
        "RAY_SERVE_SLOW_STARTUP_WARNING_S": "2", "RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S": "2"})
    try:
        text = "\n".join(lines)
        # Progress: where the processes run, what starts, the weights loading, the replica running; the summary.
        said = [f"herd: CPU binding: {line}" for line in binding.lines()]
        assert lines[:len(said)] == said, text
        assert lines[len(said)].startswith("herd: starting a local Ray")
        if binding.active:
            _check_affinities(proc.pid, binding)
        assert "herd: deploying 1 model(s): tiny (1 replica)" in lines
        assert any(re.match(r"herd:   tiny \[\w+\]: model tiny: loading ", ln) for ln in lines), text
        assert any(re.match(r"herd:   tiny \[\w+\]: model tiny: loaded in ", ln) for ln in lines), text
        assert "herd:   tiny: replicas 1/1 running" in lines
        assert re.search(r"^herd: ready in \d+\.\ds$", text, re.M)
        assert f"  gRPC       127.0.0.1:{grpc_port}  (TLS; herd.v1.Inference, grpc.health.v1.Health)" in lines
        assert f"  HTTP       https://127.0.0.1:{http_port}/v1  (OpenAI-compatible)" in lines
        # Nothing from Ray's or Serve's own loggers or workers: every line is herd's.
        assert all(ln.startswith(("herd: ", "  ")) for ln in lines), text
        summary = {ln.split()[0]: ln.split()[1] for ln in lines if re.match(r"^  (dashboard|metrics|logs) ", ln)}
        # The addresses it names answer: gRPC over TLS trusting the certificate, and only so.
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"127.0.0.1:{grpc_port}", credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, pytest.raises(grpc.RpcError) as plain:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
        assert herd_main(["client", "generate", "--address", f"127.0.0.1:{grpc_port}", "--tls-ca", str(cert),
                          "--model", "tiny", "--prompt", "Hello", "--max-tokens", "4", "--timeout", "60"]) == 0
        https = ssl.create_default_context(cafile=str(cert))
        assert urllib.request.urlopen(f"https://127.0.0.1:{http_port}/health", timeout=30, context=https).status == 200
        _renewed_certificate_is_served_without_a_restart(cert, key, tmp_path, http_port)
        assert re.match(r"^http://127\.0\.0\.1:\d+$", summary["dashboard"]), summary
        assert urllib.request.urlopen(summary["metrics"], timeout=30).status == 200
        assert os.path.isdir(os.path.join(summary["logs"], "serve"))
        _sighup_reloads_the_config_under_open_streams(proc, lines, config, f"127.0.0.1:{grpc_port}", str(cert))
        _ctrl_c_finishes_open_streams(proc, reader, lines, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}",
                                      str(cert))
    finally:
        stop_herd_serve(proc, reader)
    assert "herd: shutting down" in lines and proc.returncode == 0, "\n".join(lines[-20:])


def _renewed_certificate_is_served_without_a_restart(cert, key, tmp_path, http_port: int) -> None:
    """cert-manager renews the Secret's files in place: the HTTPS proxy (uvicorn, which reads them once) serves
    the new certificate within its renewal period (cluster.https_renewal); the gRPC proxy from its next
    connection (cluster.grpc_tls), which the rest of the test makes trusting the file, now the renewed one."""
    import shutil

    from tests.tls_certs import write_self_signed

    (tmp_path / "renewed").mkdir()
    renewed_cert, renewed_key = write_self_signed(tmp_path / "renewed")
    for path, source in ((key, renewed_key), (cert, renewed_cert)):   # moved into place, as Kubernetes does
        shutil.copy(source, f"{path}.new")
        os.replace(f"{path}.new", path)
    renewed = ssl.create_default_context(cafile=str(renewed_cert))
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"https://127.0.0.1:{http_port}/health", timeout=30, context=renewed)
            break
        except urllib.error.URLError as e:
            assert isinstance(e.reason, ssl.SSLError), e
            assert time.monotonic() < deadline, "the HTTPS proxy still serves the old certificate after 60 s"
            time.sleep(0.5)


DRAIN_TOKENS = 200
DRAIN_STREAMS = 32
RELOAD_STREAMS = 8


def _sighup_reloads_the_config_under_open_streams(proc, lines: list[str], config, address: str,
                                                  ca_file: str) -> None:
    """SIGHUP re-reads the config (cluster/serve_reload.py). One that does not validate, and one that changes
    what the proxies started with, are refused and the server goes on as it was; a new max_model_len is
    deployed while 8 streams are open, each of which still gets all its tokens, and the model then says it."""
    from cluster.client import HerdClient

    original = config.read_text()
    client = HerdClient(address, tls_ca_file=ca_file)

    def reload(text: str, outcome: str) -> str:
        config.write_text(text)
        start = len(lines)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 240
        while not any(ln.startswith(outcome) for ln in lines[start:]):
            assert time.monotonic() < deadline and proc.poll() is None, "\n".join(lines[start:])
            time.sleep(0.05)
        said = lines[start:]
        assert said[0] == f"herd: reloading {config} ...", said
        return next(ln for ln in said if ln.startswith(outcome))

    refused = reload(original.replace("max_model_len:", "max_modle_len:"), "herd: reload refused: ")
    assert "max_modle_len" in refused and refused.endswith("; still serving the previous config"), refused
    refused = reload(original + "request_timeout_s: 30\n", "herd: reload refused: ")
    assert "started with (request_timeout_s); restart herd serve" in refused, refused
    [model] = client.list_models(timeout=30).models
    assert model.max_model_len == DRAIN_TOKENS + 32            # as it was

    streams = [client.generate("tiny", [9 + i, 8, 7], max_tokens=DRAIN_TOKENS, ignore_eos=True, timeout=300)
               for i in range(RELOAD_STREAMS)]
    firsts = [next(stream) for stream in streams]
    bigger = DRAIN_TOKENS + 64
    reloaded = reload(original.replace(f"max_model_len: {DRAIN_TOKENS + 32}", f"max_model_len: {bigger}"),
                      "herd: reloaded in ")
    assert re.match(r"^herd: reloaded in \d+\.\d s$", reloaded), reloaded
    for first, stream in zip(firsts, streams):
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == DRAIN_TOKENS
        assert rest[-1].finish_reason == "length"
    [model] = client.list_models(timeout=30).models
    assert model.max_model_len == bigger                       # the new config's replica serves
    _a_reload_without_room_waits_for_a_newer_one(proc, lines, config, client)
    client.close()


def _a_reload_without_room_waits_for_a_newer_one(proc, lines: list[str], config, client) -> None:
    """A reload whose new replica no node has room for (here a resource no node has; a surge on a full cluster,
    or a GPU short, is the same wait): herd serve says what the replica waits for, the old replica goes on
    serving (max_surge_percent: it is stopped only once its replacement runs), and a newer SIGHUP with the
    config corrected ends the wait (cluster.app_deploy) and keeps that replica."""
    from cluster.client import collect

    served = config.read_text()
    shard = "    resources_per_shard: {CPU: 0.25}\n"
    assert shard in served
    config.write_text(served.replace(shard, "    resources_per_shard: {CPU: 0.25, herd-test-absent: 1}\n"
                                            "    max_surge_percent: 100\n"))
    start = len(lines)
    proc.send_signal(signal.SIGHUP)

    def said(pattern: str) -> str:
        deadline = time.monotonic() + 120
        while not any(re.search(pattern, ln) for ln in lines[start:]):
            assert time.monotonic() < deadline and proc.poll() is None, "\n".join(lines[start:])
            time.sleep(0.05)
        return next(ln for ln in lines[start:] if re.search(pattern, ln))
    waiting = said(r"^herd:   tiny: 1 replica\(s\) not placed after \d+\+ s: .*herd-test-absent")
    assert '"herd-test-absent": 1.0' in waiting, waiting
    assert collect(client.generate("tiny", [5, 6, 7], max_tokens=4, ignore_eos=True, timeout=60))[2].finish_reason \
        == "length"                                              # the old replica serves meanwhile
    config.write_text(served)
    proc.send_signal(signal.SIGHUP)
    said(r"^herd: reloaded in ")
    assert any(ln.startswith("herd: stopped waiting for the reload after ") for ln in lines[start:]), lines[start:]
    assert not any(ln.startswith("herd: reload failed") for ln in lines[start:]), lines[start:]
    # The config its replica runs again: that replica stays (cluster.deployment_version), no model loads anew.
    corrected = max(i for i, ln in enumerate(lines) if ln.startswith("herd: reloading "))
    assert not any(": loading " in ln for ln in lines[corrected:]), lines[corrected:]
    assert collect(client.generate("tiny", [5, 6, 7], max_tokens=4, ignore_eos=True, timeout=60))[2].finish_reason \
        == "length"


def _ctrl_c_finishes_open_streams(proc, reader, lines: list[str], address: str, http_address: str,
                                  ca_file: str) -> None:
    """Ctrl-C while 32 streams are open: each runs to its end (serve.shutdown() used to kill the proxies first and
    end them UNAVAILABLE), a request that arrives meanwhile gets UNAVAILABLE / 503 (retryable; Serve's own
    answers are NOT_FOUND / 404),
    and herd serve exits 0 saying so, without Ray's "(raylet) Task ServeController.graceful_shutdown failed"."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.client import HerdClient
    from cluster.proxy_not_serving import NO_APPLICATION_DETAILS

    client = HerdClient(address, tls_ca_file=ca_file)
    streams = [client.generate("tiny", [7 + i, 8, 9], max_tokens=DRAIN_TOKENS, ignore_eos=True, timeout=300)
               for i in range(DRAIN_STREAMS)]
    firsts = [next(stream) for stream in streams]        # every stream has begun
    # A Health.Watch stream never ends by itself: the ingress ends it when its drain begins (it used to hold the
    # drain for the whole graceful_shutdown_timeout_s, and then died INTERNAL with the replica).
    watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(), timeout=300)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 60
    while not any(ln.startswith("herd: finishing in-flight requests") for ln in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "\n".join(lines[-20:])
        time.sleep(0.05)
    while True:   # the proxy drops the application's route a moment after the line
        try:
            list(client.generate("tiny", [5, 6], max_tokens=1, timeout=30))
        except grpc.RpcError as e:
            assert (e.code(), e.details()) == (grpc.StatusCode.UNAVAILABLE, NO_APPLICATION_DETAILS)
            break
        assert time.monotonic() < deadline, "a new request was still served 60 s after Ctrl-C"
    https = ssl.create_default_context(cafile=ca_file)
    request = urllib.request.Request(f"https://{http_address}/v1/completions", method="POST",
                                     data=b'{"model": "tiny", "prompt": "hi"}',
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as http_late:
        urllib.request.urlopen(request, timeout=30, context=https)
    assert (http_late.value.code, http_late.value.headers["retry-after"]) == (503, "1")
    assert json.loads(http_late.value.read())["error"]["message"] == NO_APPLICATION_DETAILS
    for first, stream in zip(firsts, streams):
        rest = list(stream)
        assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == DRAIN_TOKENS
        assert rest[-1].finish_reason == "length"
    statuses = []
    with pytest.raises(grpc.RpcError) as watch_end:
        statuses.extend(r.status for r in watch)
    assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    assert (watch_end.value.code(), watch_end.value.details()) == (grpc.StatusCode.UNAVAILABLE,
                                                                  "this replica is shutting down; watch again")
    client.close()
    assert proc.wait(timeout=120) == 0
    reader.join(timeout=10)   # the output's last lines
    tail = lines[lines.index("herd: shutting down"):]
    assert any(re.match(r"herd: in-flight requests finished in \d+\.\d s", ln) for ln in tail), tail
    assert not any("graceful_shutdown failed" in ln for ln in tail), tail


def _check_affinities(pid: int, binding) -> None:
    """The engine process runs on its cores; herd serve and every other process of its Ray on the serving CPUs."""
    import psutil

    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    engines = [p for p in processes if "workers.engine_process" in " ".join(p.cmdline())]
    assert len(engines) == 1
    assert set(engines[0].cpu_affinity()) == parse_cpu_list(binding.engines["tiny"])
    for p in processes:
        if p not in engines:
            try:
                assert set(p.cpu_affinity()) == binding.serving, p.cmdline()
            except psutil.NoSuchProcess:  # a short-lived helper that ended meanwhile
                pass
