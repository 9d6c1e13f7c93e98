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

    from cluster.app import build_app_restarting

    models = [{"name": "a", "path": "/a", "resources_per_shard": {"CPU": 1}},
              {"name": "b", "path": "/b", "resources_per_shard": {"CPU": 1}}]
    for key, value in changes.pop("a", {}).items():
        models[0][key] = value
    for key, value in changes.pop("b", {}).items():
        models[1][key] = value
    cfg = ClusterConfig.from_dict({"models": models, **changes})
    return {d.name: d._version for d in serve_build(build_app_restarting(cfg, restart=restart), name="herd").deployments}


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


# ---- the chart's applications (cluster.app.build_model_app / build_ingress_app) ------------------------------
def test_every_application_builder_takes_the_one_argument_serve_gives_it():
    """Serve's declarative path (a config file, KubeRay's serveConfigV2) refuses a builder that takes more than
    one parameter: cluster.app:build_app once took a keyword and no KubeRay deploy could have built it."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app as serve_build

    two = {"models": [{"name": "a", "path": "/a", "resources_per_shard": {"CPU": 1}},
                      {"name": "b", "path": "/b", "resources_per_shard": {"CPU": 1}}]}
    built = {}
    for path, args in [("cluster.app:build_app", two), ("cluster.app:build_ingress_app", two),
                       ("cluster.app:build_model_app", {"models": two["models"][1:]})]:
        app = call_user_app_builder_with_args_if_necessary(import_attr(path), args)
        built[path] = sorted(d.name for d in serve_build(app, name="herd").deployments)
    assert built == {"cluster.app:build_app": ["Ingress", "model-a", "model-b"],
                     "cluster.app:build_ingress_app": ["Ingress"], "cluster.app:build_model_app": ["model-b"]}


def test_a_model_application_builds_one_model():
    import pytest

    from cluster.app import build_model_app

    with pytest.raises(ValueError, match="builds one model; its args name 2"):
        build_model_app({"models": [{"name": "a", "path": "/a"}, {"name": "b", "path": "/b"}]})


def test_the_charts_model_applications_build_what_the_ingress_expects(tmp_path):
    """Each model application holds its entry (less its Serve options, which are its `deployments` override) and
    only the cluster keys a replica is built from; the override gives Serve the options the one application
    gives; what it builds has the version the ingress's application expects of it (the ingress keeps a model's info only from a
    replica of that version, cluster.ingress), and the same spec the one-application build gives it."""
    from pathlib import Path

    from ray.serve._private.build_app import build_app as serve_build

    from cluster.app import (MODEL_APPLICATION_CLUSTER_KEYS, MODEL_SERVE_OPTIONS, build_app, build_ingress_app,
                             build_model_app, deployment_name, model_deployment_options)
    from cluster.app_name import model_application
    from cluster.deployment_version import model_version

    import yaml

    from tests.k8s_tools import chart_serve_applications
    from tests.test_helm import ALL_FEATURES

    # Every key the chart passes through, and the two cluster keys a model is built from set.
    all_features = tmp_path / "all-features.yaml"
    first, *rest = ALL_FEATURES["models"]
    all_features.write_text(yaml.safe_dump({
        **ALL_FEATURES,
        "config": {**ALL_FEATURES["config"],
                   "tracing": {"enabled": True, "service_name": "llm", "sample_ratio": 0.5}},
        "models": [{**first, "max_surge_percent": 50, "health_check_period_s": 5, "health_check_timeout_s": 12},
                   *rest],
        "workerGroups": [*ALL_FEATURES["workerGroups"][:-1],
                         {**ALL_FEATURES["workerGroups"][-1], "maxReplicas": 3}]}))   # room for the surge
    examples = Path(__file__).resolve().parents[1] / "helm" / "examples"
    for values_file in [*sorted(examples.glob("*.yaml")), all_features]:
        [ingress_app, *model_apps] = chart_serve_applications(values_file)
        cfg = ClusterConfig.from_dict(ingress_app["args"])
        assert [a["name"] for a in model_apps] == [model_application(ingress_app["name"], m.name) for m in cfg.models]
        [ingress] = serve_build(build_ingress_app(ingress_app["args"]), name=ingress_app["name"]).deployments
        models, specs = ingress.init_args[0], ingress.init_args[1]
        assert models is None and all(s["own_application"] for s in specs.values())
        whole = {d.name: d for d in serve_build(build_app(cfg), name="herd").deployments}
        for app, model in zip(model_apps, cfg.models):
            assert set(app["args"]) - {"models"} <= set(MODEL_APPLICATION_CLUSTER_KEYS)
            assert [m["name"] for m in app["args"]["models"]] == [model.name]
            # Its Serve options are the override, not args; with it, Serve gets what the one application gives.
            assert not set(app["args"]["models"][0]) & set(MODEL_SERVE_OPTIONS)
            [override] = app["deployments"]
            own = model_deployment_options(ClusterConfig.from_dict(app["args"]).models[0])
            effective = {**own, **{k: v for k, v in override.items()}}
            expected = model_deployment_options(model)
            for key in MODEL_SERVE_OPTIONS:
                assert effective.get(key) == expected.get(key), (values_file.name, model.name, key)
            [built] = serve_build(build_model_app(app["args"]), name=app["name"]).deployments
            assert built.name == deployment_name(model.name)
            assert model_version(built.init_args[0]) == specs[model.name]["version"], values_file.name
            assert built.init_args[0] == whole[built.name].init_args[0]
