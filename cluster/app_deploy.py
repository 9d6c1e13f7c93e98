"""Deploying herd's application onto a running Serve and waiting until it serves: `herd serve`'s start and each
of its reloads (cluster.serve_reload) go through `deploy`.

    deploy(cfg, app_name=..., route_prefix=..., logs_dir=..., interrupted=lambda: False) -> Deployed
    DeployFailed.failures      # one line per failed deployment ("model a: <its error>")

`serve.run` blocks until the application runs, and that can be forever: a replica that no node has room for
(a GPU short, a resource no node has, a rolling update's surge on a full cluster) waits to be scheduled, and
Serve keeps the old replicas serving meanwhile. herd serve must still answer its operator then: a second SIGHUP
with a corrected config, or Ctrl-C. So the application is submitted without waiting, and `deploy` polls
Serve's status until it runs, fails, or `interrupted()` says to stop waiting (Serve goes on with the update
unless a newer one replaces it). DeployProgress prints the progress meanwhile, the waiting replicas included.
A deployment that failed is started anew even when the config did not change it: a reload retries it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

POLL_S = 0.25


class DeployFailed(Exception):
    """Serve could not deploy the application; `failures` says why, one line per failed deployment."""

    def __init__(self, failures: list[str]):
        super().__init__("; ".join(failures))
        self.failures = failures


@dataclass(frozen=True)
class Deployed:
    elapsed_s: float
    finished: bool   # False: interrupted() ended the wait before the application ran


def deploy(cfg: Any, *, app_name: str, route_prefix: str, logs_dir: Optional[str], from_now: bool = False,
           interrupted: Callable[[], bool] = lambda: False, poll_s: float = POLL_S) -> Deployed:
    """Submit `cfg` as application `app_name` (a new one, or Serve's in-place update of the running one) and wait
    until it runs (module doc). from_now: the progress leaves out replica log lines written before (a reload)."""
    from ray import serve

    from cluster.app import build_app_restarting
    from cluster.startup import DeployProgress, deploy_failures
    from cluster.status import status_name

    started = time.monotonic()
    failed = failed_deployments(app_name)   # deployed again as they are, they would stay failed
    progress = DeployProgress(cfg, app_name, logs_dir, from_now=from_now).start()
    try:
        serve.run_many([serve.RunTarget(target=build_app_restarting(cfg, restart=failed), name=app_name,
                                        route_prefix=route_prefix)], wait_for_applications_running=False)
        while True:
            app = serve.status().applications.get(app_name)
            status = status_name(app.status) if app is not None else None
            if status == "RUNNING":
                return Deployed(time.monotonic() - started, finished=True)
            if status == "DEPLOY_FAILED":
                raise DeployFailed(deploy_failures(app_name))
            if app is None:
                raise DeployFailed([f"application {app_name} is no longer on the cluster (deleted meanwhile)"])
            if interrupted():
                return Deployed(time.monotonic() - started, finished=False)
            time.sleep(poll_s)
    finally:
        progress.stop()


def failed_deployments(app_name: str) -> set[str]:
    """The application's deployments that failed to deploy or are unhealthy (none before a first deploy). Serve
    leaves a deployment that is deployed again unchanged as it is, so herd starts these anew: a reload retries
    them (cluster.app.build_app's `restart`)."""
    from ray import serve

    from cluster.startup import FAILED_STATES
    from cluster.status import status_name

    app = serve.status().applications.get(app_name)
    if app is None:
        return set()
    return {name for name, d in app.deployments.items() if status_name(d.status) in FAILED_STATES}
