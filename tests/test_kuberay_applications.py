"""The chart's serveConfigV2 deployed the way KubeRay deploys it (real Ray + Serve + gRPC on 127.0.0.1): rendered
by the real `helm`, handed to Serve's declarative path (the controller's deploy_apps, what the dashboard's REST
API that KubeRay calls does), then changed as an operator changes the chart's values.

Serve versions every deployment of a declarative application by a hash of the application's `args`. With every
model in one application, any change restarted every model. The chart deploys each model as an application of
its own beside the ingress's (cluster.app.build_model_app / build_ingress_app), so:
- a change of one model's settings restarts that model (and the ingress), never the other model, which serves
  requests throughout;
- a change of the ingress's keys (limits) restarts no model;
- a change of a model's Serve options (num_replicas) restarts nothing of it: its replica serves on, and the new
  one joins it;
- the ingress reaches every model by name across applications, and keeps the new model's info (ListModels);
- a model whose checkpoint does not load fails alone, and a call to it is UNAVAILABLE at once.

Not exercised: KubeRay itself (no Kubernetes here); the dashboard's REST handler around deploy_apps."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import yaml

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from tests.serve_fixtures import free_ports, stop_herd_cluster, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
MODELS = ("alpha", "beta")
APP = "herd"
STREAMS = 8             # clients of the model left alone, back to back while the other one is redeployed


def values(paths: dict[str, str], alpha_max_model_len: int = 256, max_prompt_chars: int = 100_000,
           beta_replicas: int = 1, broken: bool = False) -> dict:
    """Chart values for two small CPU models (weights at absolute paths, as an image would carry them); with
    `broken`, a third whose path holds no checkpoint."""
    model = {"dtype": "float32", "resources_per_shard": {"CPU": 0.25}, "kv_cache_memory": 32 << 20,
             "max_model_len": 256, "graceful_shutdown_timeout_s": 20}
    models = [{**model, "name": "alpha", "path": paths["alpha"], "max_model_len": alpha_max_model_len},
              {**model, "name": "beta", "path": paths["beta"], "num_replicas": beta_replicas}]
    if broken:
        models.append({**model, "name": "gamma", "path": "/nonexistent/gamma"})
    return {"weights": {"source": "image"},
            "config": {"allow_unauthenticated": True, "limits": {"max_prompt_chars": max_prompt_chars}},
            "workerGroups": [{"name": "cpu", "replicas": 1, "minReplicas": 1, "maxReplicas": 1, "gpus": 0}],
            "models": models}


def rendered_applications(tmp_path, vals: dict) -> list[dict[str, Any]]:
    """The serveConfigV2's applications, as `helm template` renders them from `vals`."""
    from tests.k8s_tools import chart_serve_applications

    f = tmp_path / f"values-{time.monotonic_ns()}.yaml"
    f.write_text(yaml.safe_dump(vals))
    return chart_serve_applications(f)


def deploy(applications: list[dict[str, Any]]) -> None:
    """What Serve's REST API does with a PUT of a serveConfigV2 (KubeRay's call): the controller applies it."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": applications}))


def replicas() -> dict[tuple[str, str], set[str]]:
    """(application, deployment) -> ids of its RUNNING replicas."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return {(app, dep): {r["replica_id"] for r in d.get("replicas", []) if r.get("state") == "RUNNING"}
            for app, a in (details.get("applications") or {}).items()
            for dep, d in (a.get("deployments") or {}).items()}


def failed(name: str) -> bool:
    from ray import serve

    app = serve.status().applications.get(name)
    return app is not None and app.status == "DEPLOY_FAILED"


def all_running(names: list[str]) -> bool:
    from ray import serve

    apps = serve.status().applications
    return all(n in apps and apps[n].status == "RUNNING" for n in names)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    from ray import serve

    from cluster.app import serve_start_options
    from cluster.config import ClusterConfig
    from cluster.local_ray import local_ray_options, start_local_ray

    root = tmp_path_factory.mktemp("kuberay-apps")
    paths = {name: str(make_checkpoint(root, name, LLAMA2_MHA, seed=i)) for i, name in enumerate(MODELS)}
    # The proxies of this machine's Serve, on loopback (the chart's own are for pods: 0.0.0.0, fixed ports).
    local = ClusterConfig.from_dict({**dict(zip(("grpc_port", "http_port"), free_ports(2))),
                                     "models": [{"name": "alpha", "path": paths["alpha"]}]})
    start_local_ray(num_cpus=4, include_dashboard=False, namespace="herd-tests", **local_ray_options(local))
    try:
        serve.start(**serve_start_options(local))
        yield {"paths": paths, "grpc": f"127.0.0.1:{local.grpc_port}", "tmp": root}
    finally:
        stop_herd_cluster()


def test_each_model_is_an_application_and_a_change_restarts_only_what_it_touches(cluster):
    from cluster.client import HerdClient
    from cluster.status import collect_status

    tmp, paths = cluster["tmp"], cluster["paths"]
    apps = rendered_applications(tmp, values(paths))
    names = [a["name"] for a in apps]
    assert names == [APP, f"{APP}-model-alpha", f"{APP}-model-beta"]
    deploy(apps)
    wait_for(lambda: all_running(names), timeout_s=240, interval_s=0.5)

    client = HerdClient(cluster["grpc"])
    for model in MODELS:   # through the proxy and the ingress's application to the model's own
        [last] = list(client.generate(model, [5, 6, 7], timeout=60, max_tokens=4, temperature=0.0,
                                      ignore_eos=True))[-1:]
        assert last.finish_reason == "length"
    assert {m.name: m.max_model_len for m in client.list_models(timeout=30).models} == {"alpha": 256, "beta": 256}
    # Readiness (grpc.health.v1, what probes ask) looks for each model's replicas in its own application.
    assert [client.health(s, timeout=30) for s in ("", "alpha", "beta")] == ["SERVING"] * 3
    status = collect_status(APP)   # `herd status` finds the models in their own applications
    assert {m.name: len(m.replicas) for m in status.models} == {"alpha": 1, "beta": 1}

    before = replicas()
    alpha, beta = (APP + "-model-alpha", "model-alpha"), (APP + "-model-beta", "model-beta")
    assert len(before[alpha]) == len(before[beta]) == 1

    # One model's engine setting changes: alpha restarts, beta serves on, untouched, throughout.
    stop, results = threading.Event(), []

    def beta_client(i: int) -> None:
        while not stop.is_set():
            try:
                out = list(client.generate("beta", [9 + i] * 8, timeout=60, max_tokens=16, temperature=0.0,
                                           ignore_eos=True))
                results.append(out[-1].finish_reason)
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                results.append(repr(e))

    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(beta_client, i) for i in range(STREAMS)]
        try:
            wait_for(lambda: len(results) >= STREAMS, timeout_s=60)
            deploy(rendered_applications(tmp, values(paths, alpha_max_model_len=192)))
            wait_for(lambda: replicas().get(alpha) not in (None, set(), before[alpha]) and all_running(names),
                     timeout_s=240, interval_s=0.5)
            served_during = len(results)
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=120)
    after = replicas()
    assert after[beta] == before[beta], "beta was restarted by a change of alpha's settings"
    assert after[alpha] != before[alpha]
    failures = [r for r in results if r != "length"]
    assert not failures, failures[:5]
    assert served_during > STREAMS
    # The ingress (restarted with the new config) keeps the new replica's info, not the old one's.
    wait_for(lambda: {m.name: m.max_model_len for m in client.list_models(timeout=30).models}
             == {"alpha": 192, "beta": 256}, timeout_s=60, interval_s=0.5)

    # The ingress's own keys change: no model restarts.
    deploy(rendered_applications(tmp, values(paths, alpha_max_model_len=192, max_prompt_chars=50_000)))
    ingress = (APP, "Ingress")
    wait_for(lambda: replicas().get(ingress) not in (None, set(), after[ingress]) and all_running(names),
             timeout_s=120, interval_s=0.5)
    limited = replicas()
    assert limited[alpha] == after[alpha] and limited[beta] == after[beta]

    # A model's Serve options change on its running replicas (its application's `deployments` override): beta
    # scales to two replicas, its first one serving on.
    deploy(rendered_applications(tmp, values(paths, alpha_max_model_len=192, max_prompt_chars=50_000,
                                             beta_replicas=2)))
    wait_for(lambda: len(replicas().get(beta, ())) == 2 and all_running(names), timeout_s=120, interval_s=0.5)
    scaled = replicas()
    assert scaled[beta] > limited[beta], "beta's running replica was replaced to scale it"
    assert scaled[alpha] == limited[alpha]

    # A model whose checkpoint does not load: its application fails, alone; a call to it is UNAVAILABLE at once
    # (Serve would hold it for a replica until its deadline), and the other models serve on, untouched.
    deploy(rendered_applications(tmp, values(paths, alpha_max_model_len=192, max_prompt_chars=50_000,
                                             beta_replicas=2, broken=True)))
    wait_for(lambda: failed(f"{APP}-model-gamma") and all_running(names), timeout_s=180, interval_s=0.5)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        list(client.generate("gamma", [5, 6, 7], timeout=60, max_tokens=4))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
    assert "'gamma' has no replica: its deployment failed" in refused.value.details()
    assert time.monotonic() - started < 10, "the call waited for a replica that never comes"
    assert client.health("gamma", timeout=30) == "NOT_SERVING" and client.health("beta", timeout=30) == "SERVING"
    final = replicas()
    assert final[alpha] == scaled[alpha] and final[beta] == scaled[beta]
    [last] = list(client.generate("beta", [5, 6, 7], timeout=60, max_tokens=4, temperature=0.0,
                                  ignore_eos=True))[-1:]
    assert last.finish_reason == "length"
    [last] = list(client.generate("alpha", [5, 6, 7], timeout=60, max_tokens=4, temperature=0.0,
                                  ignore_eos=True))[-1:]
    assert last.finish_reason == "length"
