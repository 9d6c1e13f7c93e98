"""`herd serve --address` on a Ray cluster it joins, where Serve and other applications may run beside herd
(cluster/shared_serve.py): herd's stop ends its own application only, and it refuses a Serve it cannot serve
on. The cluster is this test process's private Ray on 127.0.0.1; each herd serve is a process of its own, as
an operator runs it."""
from __future__ import annotations

import re

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from tests.herd_serve_process import run_herd_serve, start_herd_serve, stop_herd_serve
from tests.serve_fixtures import free_port, stop_herd_cluster, wait_for

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def address(tmp_path_factory):
    """The GCS address of a private Ray with nothing on it yet."""
    import ray

    from cluster.local_ray import start_local_ray

    start_local_ray(num_cpus=4, include_dashboard=False, namespace="herd-tests", log_to_driver=False)
    try:
        yield ray._private.worker._global_node.gcs_address
    finally:
        stop_herd_cluster()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("joined")
    path = make_checkpoint(root, "tiny", LLAMA2_MHA)
    file = root / "cluster.yaml"
    file.write_text(f"models:\n  - name: tiny\n    path: {path}\n    dtype: float32\n    max_model_len: 256\n"
                    "    resources_per_shard: {CPU: 0.25}\n    kv_cache_memory: 16777216\n")
    return file


def _deploy_other_application() -> None:
    """Someone else's application on the same Serve."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Other:
        def __call__(self, request) -> str:
            return "other"

    serve.run(Other.bind(), name="other", route_prefix="/other", blocking=False)
    wait_for(lambda: serve.status().applications["other"].status == "RUNNING", timeout_s=120, interval_s=0.2)


def _generate(grpc_port: int) -> str:
    from cluster.client import HerdClient, collect

    with HerdClient(f"127.0.0.1:{grpc_port}") as client:
        return collect(client.generate("tiny", [5, 6, 7], max_tokens=4, temperature=0.0, ignore_eos=True,
                                       timeout=120))[2].finish_reason


def test_what_herd_serve_takes_from_a_running_serve():
    """Its problems (no herd services on its gRPC proxy; an application named herd, or another one at herd's
    route prefix, already there) and its ports, adopted with a warning each."""
    from cluster.app import GRPC_SERVICER_FUNCTIONS
    from cluster.config import ClusterConfig
    from cluster.shared_serve import RunningServe

    ours = RunningServe(grpc_port=9000, http_port=8000, grpc_servicer_functions=tuple(GRPC_SERVICER_FUNCTIONS),
                        applications=("other",))
    assert ours.problems() == []
    bare = RunningServe(grpc_port=9000, http_port=8000, grpc_servicer_functions=(), applications=("herd",))
    [no_services, taken] = bare.problems()
    assert "lacks herd's services (cluster.proxy_streams.add_inference_servicer" in no_services
    assert taken.startswith("an application named 'herd' already runs")
    at_root = RunningServe(grpc_port=9000, http_port=8000, grpc_servicer_functions=tuple(GRPC_SERVICER_FUNCTIONS),
                           applications=("other",), route_prefixes=("/",))
    assert at_root.problems() == ["another application on this Ray cluster's Serve has the HTTP route prefix '/' "
                                  "that herd's application takes"]

    cfg = ClusterConfig.from_dict({"grpc_port": 9100, "http_port": 8000, "models": [
        {"name": "m", "path": "/nonexistent"}]})
    adopted, warnings = ours.adopt(cfg)
    assert (adopted.grpc_port, adopted.http_port) == (9000, 8000)
    assert warnings == ["Serve already runs on this Ray cluster: its gRPC proxy keeps port 9000 (the config's "
                        "grpc_port 9100 is not used)"]
    assert ours.adopt(adopted)[1] == []


@pytest.mark.slow
def test_a_serve_without_herds_grpc_services_is_refused(address, config):
    """Serve started by someone else, its gRPC proxy without herd's servicer functions: herd's front door
    would answer UNIMPLEMENTED, so herd serve says why and exits 1, touching nothing."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options={"port": free_port()})
    try:
        _deploy_other_application()
        proc, lines, reader, summary = run_herd_serve(config, "--address", address)
        assert proc.wait(timeout=120) == 1 and not summary, "\n".join(lines)
        reader.join(timeout=10)
        text = "\n".join(lines)
        assert re.search(r"^herd: error: Serve already runs on this Ray cluster, and its gRPC proxy \(port \d+\) "
                         r"lacks herd.s services \(cluster\.proxy_streams\.add_inference_servicer, ", text, re.M), text
        assert serve.status().applications["other"].status == "RUNNING"
        assert "herd" not in serve.status().applications
    finally:
        serve.shutdown()


@pytest.mark.slow
def test_stopping_herd_serve_leaves_the_clusters_other_applications_running(address, config):
    """herd serve starts Serve; another application joins it; Ctrl-C drains and deletes herd's application
    only, and Serve keeps running for the other one. A second herd serve then joins that Serve: it keeps the
    proxies' ports (and says so), refuses a third one beside it, and leaves Serve running at its end."""
    from ray import serve

    proc, lines, reader, grpc_port, http_port = start_herd_serve(config, "--address", address)
    try:
        assert "herd: starting Serve: gRPC proxy on 127.0.0.1:" + str(grpc_port) + ", HTTP proxy on " in "\n".join(lines)
        _deploy_other_application()
        assert _generate(grpc_port) == "length"
    finally:
        stop_herd_serve(proc, reader)
    text = "\n".join(lines)
    assert proc.returncode == 0, text
    assert "herd: Serve keeps running on the cluster for its other applications: other" in lines, text
    assert set(serve.status().applications) == {"other"}
    assert serve.status().applications["other"].status == "RUNNING"

    proc, lines, reader, summary = run_herd_serve(config, "--address", address, "--grpc-port", str(free_port()))
    try:
        text = "\n".join(lines)
        assert summary, text
        assert (f"herd: WARNING: Serve already runs on this Ray cluster: its gRPC proxy keeps port {grpc_port} "
                "(the config's grpc_port") in text, text
        assert f"  gRPC       127.0.0.1:{grpc_port}" in text, text    # the address that answers
        assert _generate(grpc_port) == "length"
        third, third_lines, third_reader, _ = run_herd_serve(config, "--address", address)
        assert third.wait(timeout=120) == 1, "\n".join(third_lines)
        third_reader.join(timeout=10)
        assert ("herd: error: an application named 'herd' already runs on this Ray cluster (another herd serve or "
                "a RayService); deploying would replace it") in third_lines, "\n".join(third_lines)
        assert serve.status().applications["herd"].status == "RUNNING"   # the third one touched nothing
    finally:
        stop_herd_serve(proc, reader)
    assert proc.returncode == 0, "\n".join(lines)
    assert "herd: Serve keeps running on the cluster (it was running before herd serve joined)" in lines
    assert set(serve.status().applications) == {"other"}
