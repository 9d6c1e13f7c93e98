"""What `herd serve`'s reload (SIGHUP) accepts and refuses before it deploys anything (cluster/serve_reload.py);
a real reload under open streams is in tests/test_serve_startup.py."""
from __future__ import annotations

import pytest

from cluster import cpu_binding
from cluster.config import ClusterConfig, ConfigError
from cluster.serve_reload import ReloadRefused, checked_config, started_with
from tests.checkpoints import make_text_checkpoint


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return str(make_text_checkpoint(tmp_path_factory.mktemp("reload")))


def _config(path: str, **cluster) -> ClusterConfig:
    return ClusterConfig.from_dict({"models": [{"name": "m", "path": path, "resources_per_shard": {"CPU": 1}}],
                                    **cluster})


def _started(cfg, cpus=frozenset({0, 1, 2, 3})):
    binding = cpu_binding.plan(cfg.models, cpus, cfg.cpu_binding, cfg.cpu_binding_serving_cpus)
    return cpu_binding.with_engine_cpu_cores(cfg, binding), started_with(cfg, local=True, cpus=cpus, binding=binding)


def test_a_model_change_is_accepted_with_the_same_cpu_binding(path):
    current, started = _started(_config(path))
    assert current.models[0].engine_cpu_cores == "3"
    bigger = _config(path)
    bigger = bigger.model_copy(update={"models": [bigger.models[0].model_copy(update={"max_num_seqs": 7})]})
    new = checked_config(lambda: bigger, current, started)
    assert new.models[0].max_num_seqs == 7 and new.models[0].engine_cpu_cores == "3"   # bound as at start


@pytest.mark.parametrize("change, named", [
    ({"grpc_port": 9100}, "grpc_port"),
    ({"request_timeout_s": 30}, "request_timeout_s"),
    ({"enable_reflection": True}, "enable_reflection"),
    ({"serve_transport": "ray"}, "serve_transport"),
    ({"limits": {"max_grpc_message_bytes": 1 << 20}}, "limits"),
])
def test_what_the_proxies_and_ray_started_with_needs_a_restart(path, change, named):
    current, started = _started(_config(path))
    with pytest.raises(ReloadRefused) as refused:
        checked_config(lambda: _config(path, **change), current, started)
    assert str(refused.value) == (f"it changes what Serve's proxies or the local Ray were started with ({named}); "
                                  "restart herd serve to apply that")


def test_a_config_that_does_not_load_or_whose_checkpoint_is_missing_is_refused(path, tmp_path):
    current, started = _started(_config(path))

    def broken():
        raise ConfigError("cluster.yaml: models[0].max_modle_len: extra inputs are not permitted")
    with pytest.raises(ReloadRefused, match="max_modle_len"):
        checked_config(broken, current, started)
    with pytest.raises(ReloadRefused, match=f"path {tmp_path / 'gone'}: no such folder"):
        checked_config(lambda: _config(str(tmp_path / "gone")), current, started)


def test_a_change_of_the_cpu_binding_needs_a_restart(path):
    current, started = _started(_config(path))
    two = ClusterConfig.from_dict({"models": [{"name": "m", "path": path, "resources_per_shard": {"CPU": 1}},
                                              {"name": "n", "path": path, "resources_per_shard": {"CPU": 1}}]})
    with pytest.raises(ReloadRefused) as refused:   # a second bound engine would take CPU 2 from the serving path
        checked_config(lambda: two, current, started)
    assert str(refused.value) == ("it changes the CPU binding (where Ray and Serve run: CPU 0-2 -> CPU 0-1); "
                                  "restart herd serve to apply that")


def test_on_a_joined_cluster_only_the_proxies_count(path):
    cfg = _config(path)
    started = started_with(cfg, local=False, cpus=None, binding=None)
    assert checked_config(lambda: _config(path, cpu_binding="off"), cfg, started).cpu_binding == "off"
    with pytest.raises(ReloadRefused, match=r"\(http_port\)"):
        checked_config(lambda: _config(path, http_port=8100), cfg, started)


def test_a_reload_that_breaks_unexpectedly_keeps_the_server_serving(path, tmp_path, monkeypatch, capsys):
    """herd serve's SIGHUP handler (cluster.serve_cli._reload): whatever the deploy raises, the server goes on
    with the config it has and says why."""
    from types import SimpleNamespace

    from cluster import app_deploy, serve_cli
    from cluster.cli import build_parser

    file = tmp_path / "cluster.yaml"
    file.write_text(f"models:\n  - name: m\n    path: {path}\n    resources_per_shard: {{CPU: 1}}\n")
    current, started = _started(ClusterConfig.from_yaml(file))

    def broken_deploy(new, **_):
        raise ValueError("the controller went away")
    monkeypatch.setattr(app_deploy, "deploy", broken_deploy)
    monkeypatch.setattr(serve_cli, "_logs_dir", lambda: None)
    args = build_parser().parse_args(["serve", str(file)])
    assert serve_cli._reload(args, current, started, None) is current
    err = capsys.readouterr().err
    assert f"herd: reloading {file} ..." in err
    assert "herd: reload failed: ValueError('the controller went away'); `herd status` shows what runs now" in err

    demo = SimpleNamespace(config=None)
    assert serve_cli._reload(demo, current, started, None) is current
    assert "there is no config file to reload" in capsys.readouterr().err
