"""cluster.app_deploy: the application is submitted without Serve's blocking wait, and herd's own wait ends when
it runs, when it fails (each deployment's reason), or when herd serve has something else to do. Serve's status
is scripted here; tests/test_serve_startup.py reloads a real herd serve into a wait that only a newer SIGHUP
ends."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.app_deploy import DeployFailed, deploy
from cluster.config import ClusterConfig

CFG = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/a", "resources_per_shard": {"CPU": 1}}]})


@pytest.fixture
def serve_script(monkeypatch):
    """Serve's application status, one entry per look (the last one repeats; deploy looks once before it
    submits); the submitted targets."""
    from ray import serve

    submitted, script = [], []

    def run_many(targets, *, wait_for_applications_running):
        assert wait_for_applications_running is False   # herd waits itself
        submitted.extend(targets)

    def status():
        entry = script.pop(0) if len(script) > 1 else script[0]
        if entry is None:
            return SimpleNamespace(applications={})
        state, deployments = entry
        return SimpleNamespace(applications={"herd": SimpleNamespace(status=state, message="failed",
                                                                     deployments=deployments)})
    monkeypatch.setattr(serve, "run_many", run_many)
    monkeypatch.setattr(serve, "status", status)
    return submitted, script


def test_waits_until_the_application_runs(serve_script):
    submitted, script = serve_script
    script.extend([("DEPLOYING", {})] * 3 + [("RUNNING", {})])
    deployed = deploy(CFG, app_name="herd", route_prefix="/", logs_dir=None, poll_s=0)
    assert deployed.finished and deployed.elapsed_s >= 0
    [target] = submitted
    assert (target.name, target.route_prefix) == ("herd", "/")


def test_a_failed_deployment_says_why(serve_script):
    _, script = serve_script
    failed = SimpleNamespace(status="DEPLOY_FAILED", message="Traceback ...\nValueError: no room", replica_states={})
    script.extend([("DEPLOYING", {}), ("DEPLOY_FAILED", {"model-a": failed})])
    with pytest.raises(DeployFailed) as e:
        deploy(CFG, app_name="herd", route_prefix="/", logs_dir=None, poll_s=0)
    assert e.value.failures == ["model a: ValueError: no room"]


def test_an_application_deleted_meanwhile_fails(serve_script):
    _, script = serve_script
    script.extend([("DEPLOYING", {}), None])
    with pytest.raises(DeployFailed, match="no longer on the cluster"):
        deploy(CFG, app_name="herd", route_prefix="/", logs_dir=None, poll_s=0)


def test_an_interruption_ends_the_wait_of_an_update_that_cannot_finish(serve_script):
    _, script = serve_script
    script.append(("DEPLOYING", {}))         # a replica with no room: Serve never gets there
    polls = []

    def interrupted() -> bool:               # a SIGHUP / Ctrl-C arrives on the third look
        polls.append(1)
        return len(polls) == 3
    deployed = deploy(CFG, app_name="herd", route_prefix="/", logs_dir=None, interrupted=interrupted, poll_s=0)
    assert not deployed.finished and len(polls) == 3


def test_a_deployment_that_failed_before_is_started_anew(serve_script):
    """A reload after a failure retries what failed, even unchanged (Serve would leave it failed)."""
    from ray.serve._private.build_app import build_app as serve_build

    from cluster.app import build_app

    submitted, script = serve_script
    failed = SimpleNamespace(status="DEPLOY_FAILED", message="ValueError: out of memory", replica_states={})
    ingress = SimpleNamespace(status="HEALTHY", message="", replica_states={"RUNNING": 1})
    script.extend([("DEPLOY_FAILED", {"model-a": failed, "Ingress": ingress}), ("RUNNING", {})])
    assert deploy(CFG, app_name="herd", route_prefix="/", logs_dir=None, poll_s=0).finished

    def versions(app) -> dict[str, str]:
        return {d.name: d._version for d in serve_build(app, name="herd").deployments}
    fresh, sent = versions(build_app(CFG)), versions(submitted[0].target)
    assert sent["Ingress"] == fresh["Ingress"]
    assert sent["model-a"] != fresh["model-a"] and sent["model-a"].startswith(fresh["model-a"])
