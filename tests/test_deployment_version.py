"""cluster.deployment_version: an update restarts the replicas of what changed and only those (Serve restarts a
deployment whose version changes and reconfigures the others in place). tests/test_serve_startup.py reloads a
real herd serve back to the config its replica runs, and no model loads again."""
from __future__ import annotations

from typing import Any

from cluster.config import ClusterConfig


def versions(restart: tuple[str, ...] = (), **changes: Any) -> dict[str, str]:
    """{deployment name: version} of the application cluster.app builds for a two-model config (as Serve's own
    build makes it: serve.run's deployments)."""
    from ray.serve._private.build_app import build_app as serve_build

    from cluster.app import build_app

    models = [{"name": "a", "path": "/a", "resources_per_shard": {"CPU": 1}},
              {"name": "b", "path": "/b", "resources_per_shard": {"CPU": 1}}]
    for key, value in changes.pop("a", {}).items():
        models[0][key] = value
    for key, value in changes.pop("b", {}).items():
        models[1][key] = value
    cfg = ClusterConfig.from_dict({"models": models, **changes})
    return {d.name: d._version for d in serve_build(build_app(cfg, restart=restart), name="herd").deployments}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def test_the_same_config_has_the_same_versions():
    first = versions()
    assert set(first) == {"model-a", "model-b", "Ingress"} and all(first.values())
    assert versions() == first        # not Serve's random version: a reload of the same file restarts nothing


def test_a_models_engine_setting_restarts_that_model_and_the_ingress():
    base = versions()
    assert changed(base, versions(b={"max_num_seqs": 8})) == {"model-b", "Ingress"}
    assert changed(base, versions(a={"max_model_len": 512})) == {"model-a", "Ingress"}


def test_serve_options_change_in_place():
    """Capacity, autoscaling, health and surge are Serve's options, which it applies to running replicas."""
    base = versions()
    assert changed(base, versions(a={"max_ongoing_requests": 9, "serve_max_queued_requests": 3,
                                      "max_surge_percent": 100, "health_check_period_s": 5.0})) == set()
    assert changed(base, versions(ingress_max_queued_requests=8)) == set()


def test_ingress_settings_restart_only_the_ingress():
    base = versions()
    assert changed(base, versions(limits={"max_stop_strings": 2})) == {"Ingress"}
    with_key = versions(api_keys=["sk-secret-one"])
    assert changed(base, with_key) == {"Ingress"}
    assert changed(with_key, versions(api_keys=["sk-secret-two"])) == {"Ingress"}
    assert not any("secret" in v for v in with_key.values())


def test_a_failed_deployment_is_started_anew():
    """Serve leaves an unchanged deployment as it is, failed or not: a retry of the same config needs a new
    version for what failed, and only for that."""
    base = versions()
    retried = versions(restart=("model-a",))
    assert changed(base, retried) == {"model-a"}
    assert retried["model-a"].startswith(base["model-a"] + "-")
    assert changed(retried, versions(restart=("model-a",))) == {"model-a"}   # each retry anew


def test_the_ingress_keeps_only_the_deployed_versions_model_info():
    """A rolling update with a surge can start the new ingress while only the old model replica runs: its info
    (another max_model_len) answers that call but is not kept; the new replica's is."""
    import asyncio
    from types import SimpleNamespace

    from cluster.ingress import Frontend

    answers = [{"max_model_len": 256, "version": "old"}, {"max_model_len": 320, "version": "new"},
               {"max_model_len": 999, "version": "new"}]
    asked = []

    async def model_info():
        asked.append(1)
        return answers[len(asked) - 1]
    handle = SimpleNamespace(model_info=SimpleNamespace(remote=model_info))
    frontend = Frontend({"m": handle}, {"m": {"name": "m", "path": "/m", "version": "new"}})
    route = frontend.routes["m"]

    async def lengths() -> list[int]:
        return [(await frontend.info(route))["max_model_len"] for _ in range(3)]
    assert asyncio.run(lengths()) == [256, 320, 320] and len(asked) == 2
    assert asyncio.run(frontend.model_entry("m"))["max_model_len"] == 320


def test_a_replica_reports_the_version_of_what_it_was_built_from():
    from cluster.app import build_app, model_spec
    from cluster.deployment_version import model_version
    from ray.serve._private.build_app import build_app as serve_build

    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/a", "resources_per_shard": {"CPU": 1}}]})
    deployed = {d.name: d._version for d in serve_build(build_app(cfg), name="herd").deployments}
    assert model_version(model_spec(cfg.models[0], tracing=cfg.tracing.model_dump())) == deployed["model-a"]
