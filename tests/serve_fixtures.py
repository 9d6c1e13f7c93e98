"""A real herd cluster for integration tests: local Ray on 127.0.0.1, Serve with the gRPC and HTTP proxies on
free loopback ports, the herd application from a config dict. One per test module (start-up costs tens of
seconds on a 2-core machine); the fixture shuts down exactly what it started (serve.shutdown, ray.shutdown —
never `ray stop`)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import grpc

from benchmarks.bench_common import free_port, free_ports  # noqa: F401 - the tests import free_port from here


@dataclass
class HerdCluster:
    grpc_address: str
    http_url: str
    config: dict[str, Any]
    api_key: str | None

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_address)

    def model_handle(self, model: str):
        from ray import serve

        from cluster.app import APP_NAME, deployment_name
        return serve.get_deployment_handle(deployment_name(model), app_name=APP_NAME)

    def model_stats(self, model: str) -> dict[str, Any]:
        return self.model_handle(model).stats.remote().result(timeout_s=30)

    def shard_worker_pids(self) -> list[int]:
        """Process ids of the live shard workers (the actors of the TP x PP models), from Ray's actor table:
        fault tests kill one, without reaching into a replica's engine."""
        import ray._private.state as state
        return sorted(info["Pid"] for info in state.actors().values()
                      if info.get("ActorClassName") == "ShardWorker" and info.get("State") == "ALIVE")


# Tries at starting a cluster when a proxy's port was taken before it bound (see start_herd_cluster).
START_ATTEMPTS = 3


def start_herd_cluster(config: dict[str, Any], *, num_cpus: int = 4, api_key: str | None = None,
                       ready_timeout_s: float = 300) -> HerdCluster:
    """Start Ray + Serve + the herd app from `config` (host/ports are filled in). Blocks until the app runs.

    The proxies' ports are free when chosen (free_port) but may be taken before Serve binds them (by one of the
    many ports Ray's own processes open meanwhile): a start that fails to bind is retried on new ports."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_herd_cluster(config, num_cpus, api_key, ready_timeout_s)
        except Exception as e:  # noqa: BLE001 - only the port race is retried
            if attempt == START_ATTEMPTS or "Failed to bind" not in str(e):
                raise
    raise AssertionError("unreachable")


def _start_herd_cluster(config: dict[str, Any], num_cpus: int, api_key: str | None,
                        ready_timeout_s: float) -> HerdCluster:
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
    from ray import serve

    from cluster.app import APP_NAME, build_app, serve_start_options
    from cluster.config import ClusterConfig
    from cluster.local_ray import local_ray_options, start_local_ray

    grpc_port, http_port = free_ports(2)
    config = {**config, "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port}
    cfg = ClusterConfig.from_dict(config)
    # A private Ray (never a cluster named in /tmp/ray/ray_current_cluster), every port on loopback, the gRPC
    # proxy bound to the config's host and holding its message limit: what `herd serve` starts.
    start_local_ray(num_cpus=num_cpus, include_dashboard=False, namespace="herd-tests", **local_ray_options(cfg),
                    log_to_driver=os.environ.get("HERD_TEST_RAY_LOGS") == "1")
    try:
        serve.start(**serve_start_options(cfg))
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        deadline = time.monotonic() + ready_timeout_s
        while (status := serve.status().applications[APP_NAME]).status != "RUNNING":
            if status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"herd app failed to deploy: {status.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"herd app not RUNNING after {ready_timeout_s}s: {serve.status()}")
            time.sleep(0.5)
    except BaseException:
        stop_herd_cluster()
        raise
    return HerdCluster(f"127.0.0.1:{cfg.grpc_port}", f"http://127.0.0.1:{cfg.http_port}", config, api_key)


@contextlib.contextmanager
def running_herd_cluster(config: dict[str, Any], **kwargs) -> Iterator[HerdCluster]:
    """start_herd_cluster for the life of a `with` block (a module fixture's body)."""
    cluster = start_herd_cluster(config, **kwargs)
    try:
        yield cluster
    finally:
        stop_herd_cluster()


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.05):
    """predicate()'s first truthy value, polled until timeout_s (a guard against hangs, not a timing)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError("condition not met in time")


def stop_herd_cluster() -> None:
    """End the tests' private Ray, Serve in it. serve.shutdown() first is not needed (the controller and the
    proxies end with their Ray) and cost ~1.8 s more per cluster, printing Ray's graceful_shutdown failure."""
    import ray

    ray.shutdown()


def process_running(pid: int) -> bool:
    """The process is running (a zombie nobody has reaped yet has exited)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
