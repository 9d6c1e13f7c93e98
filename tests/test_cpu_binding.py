"""cpu_binding: which engine processes a local herd serve gives cores of their own, and where the rest runs."""
from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest

from cluster import cpu_binding
from cluster.config import ClusterConfig, ConfigError
from workers.cpu_affinity import parse_cpu_list


def _models(*entries: dict) -> list:
    defaults = {"path": "/ckpt", "resources_per_shard": {"CPU": 1}, "num_replicas": 1}
    return ClusterConfig.from_dict({"models": [{**defaults, **e} for e in entries]}).models


def test_one_engine_gets_the_top_core_and_the_serving_path_the_rest():
    b = cpu_binding.plan(_models({"name": "a"}), {0, 1}, serving_cpus=1)
    assert b.engines == {"a": "1"} and b.serving == {0} and b.unbound == {}
    assert b.lines() == ["model a's engine process on CPU 1",
                         "Ray, Serve's proxy, the ingress and the replicas on CPU 0"]


def test_cores_follow_the_cpu_reservation_and_keep_one_for_serving():
    models = _models({"name": "big", "resources_per_shard": {"CPU": 3}}, {"name": "small"},
                     {"name": "late", "resources_per_shard": {"CPU": 2}})
    b = cpu_binding.plan(models, range(6), serving_cpus=2)  # 6 CPUs: 3 + 1 bound, 2 left for serving: late's 2 would leave none
    assert b.engines == {"big": "3-5", "small": "2"} and b.serving == {0, 1} and b.active
    assert b.unbound == {"late": "its 2 engine thread(s) need 2 core(s); 0 free beside the serving path's 2"}
    assert b.floating == {"late": "2-5"}  # left to the OS: every CPU but the serving path's reserve
    assert "model late not bound: its 2 engine thread(s) need 2 core(s); 0 free beside the serving path's 2; its " \
           "engine process left to the OS on CPU 2-5 (off the serving path's reserve)" in b.lines()
    b = cpu_binding.plan(models, range(7), serving_cpus=1)  # one more CPU and a smaller reserve: late fits
    assert b.engines == {"big": "4-6", "small": "3", "late": "1-2"} and b.serving == {0} and b.unbound == {}
    # A fractional reservation is one thread.
    assert cpu_binding.plan(_models({"name": "q", "resources_per_shard": {"CPU": 0.25}}), {0, 1},
                            serving_cpus=1).engines == {"q": "1"}


@pytest.mark.parametrize("entry, why", [
    ({"num_replicas": 2}, "up to 2 replicas"),
    ({"num_replicas": None, "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}, "up to 3 replicas"),
])
def test_models_with_several_replicas_float_and_say_why(entry, why):
    b = cpu_binding.plan(_models({"name": "bound"}, {"name": "other", **entry}), {0, 1, 2, 3})
    # The serving path runs on 0-2 and keeps 0-1 (its reserve, cpu_binding_serving_cpus 2) from the floating ones.
    assert b.engines == {"bound": "3"} and why in b.unbound["other"] and b.floating == {"other": "2-3"}
    assert b.serving == {0, 1, 2}


def test_an_engine_not_bound_stays_off_the_serving_reserve():
    """On 2 vCPUs with one CPU kept for serving, a second model's engine floats on the first one's core: left
    on both CPUs it settled on the serving one, and every refusal queued behind it."""
    b = cpu_binding.plan(_models({"name": "a"}, {"name": "b"}), {0, 1}, serving_cpus=1)
    assert b.engines == {"a": "1"} and b.serving == {0} and b.floating == {"b": "1"}
    assert b.engine_cpu_cores == {"a": "1", "b": "1"}


@pytest.mark.parametrize("entry, why", [
    ({"engine_process": False}, "engine_process is off"),
    ({"tensor_parallel_size": 2, "resources_per_shard": {"CPU": 0.25}}, "tensor x pipeline parallel group"),
])
def test_cpu_work_in_ray_workers_binds_nothing(entry, why):
    """Confining Ray's workers to the serving CPUs would take cores from such a model: nothing moves."""
    b = cpu_binding.plan(_models({"name": "bound"}, {"name": "other", **entry}), {0, 1, 2, 3})
    assert not b.active and b.engines == {} and b.serving == {0, 1, 2, 3}
    assert why in b.unbound["other"] and b.lines() == [
        f"not applied (the OS places every process): model other: {b.unbound['other']}"]


def test_gpu_models_are_not_touched():
    b = cpu_binding.plan(_models({"name": "cpu"}, {"name": "gpu", "resources_per_shard": {"GPU": 1}},
                                 {"name": "gpu-tp", "tensor_parallel_size": 2, "resources_per_shard": {"GPU": 1}}),
                         {0, 1}, serving_cpus=1)
    assert b.engines == {"cpu": "1"} and b.unbound == {} and b.floating == {}
    b = cpu_binding.plan(_models({"name": "gpu", "resources_per_shard": {"GPU": 1}}), {0, 1})
    assert not b.active and b.unbound == {} and b.lines() == ["not applied: no model to bind"]


def test_a_models_own_cores_are_kept_off_the_serving_path():
    models = _models({"name": "own", "engine_cpu_cores": "2-3"}, {"name": "auto"})
    b = cpu_binding.plan(models, range(4), serving_cpus=1)
    assert b.engines == {"auto": "1"} and b.serving == {0}  # own's 2-3 are neither given away nor served on
    # Only explicit lists, nothing to bind: the serving path still leaves them alone.
    b = cpu_binding.plan(_models({"name": "own", "engine_cpu_cores": "3"}, {"name": "x", "num_replicas": 2}), range(4))
    assert b.active and b.engines == {} and b.serving == {0, 1, 2}


def test_nothing_to_bind():
    assert cpu_binding.plan(_models({"name": "a"}), {0, 1}, "off") is None
    single = cpu_binding.plan(_models({"name": "a"}), {0}, serving_cpus=1)  # no core to spare for serving
    assert not single.active and "0 free beside the serving path's 1" in single.unbound["a"]
    # By default the serving path keeps two CPUs: a 2-CPU host binds nothing (module doc), a 3-CPU one binds;
    # keeping one, a 2-CPU host binds the engine to one.
    two = cpu_binding.plan(_models({"name": "a"}), {0, 1})
    assert not two.active and "0 free beside the serving path's 2" in two.unbound["a"]
    assert cpu_binding.plan(_models({"name": "a"}), {0, 1, 2}).engines == {"a": "2"}
    assert cpu_binding.plan(_models({"name": "a"}), {0, 1}, serving_cpus=1).engines == {"a": "1"}
    assert not cpu_binding.plan(_models({"name": "a", "num_replicas": 2}), {0, 1}).active
    assert not cpu_binding.plan(_models({"name": "own", "engine_cpu_cores": "0-1"}), {0, 1}).active  # all taken
    # A model's own list that leaves the serving path fewer CPUs than it keeps moves nothing...
    assert not cpu_binding.plan(_models({"name": "own", "engine_cpu_cores": "1"}), {0, 1}, serving_cpus=2).active
    # ... unless the serving path is to keep fewer.
    own = cpu_binding.plan(_models({"name": "own", "engine_cpu_cores": "1"}), {0, 1}, serving_cpus=1)
    assert own.active and own.serving == {0} and own.engines == {}
    with pytest.raises(ValueError, match="cpu_binding must be one of"):
        cpu_binding.plan(_models({"name": "a"}), {0, 1}, "always")


@pytest.mark.parametrize("cpus, text", [({0}, "0"), ({0, 1, 2, 5}, "0-2,5"), ({7, 3, 4}, "3-4,7"), (set(), "")])
def test_cpu_lists_are_written_as_linux_reads_them(cpus, text):
    assert cpu_binding.format_cpus(cpus) == text
    if cpus:
        assert parse_cpu_list(text) == cpus


def test_the_config_keys():
    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/x"}]})
    assert cfg.cpu_binding == cpu_binding.DEFAULT_CPU_BINDING == "auto"
    assert typing.get_args(ClusterConfig.model_fields["cpu_binding"].annotation) == cpu_binding.CPU_BINDING_MODES
    assert cfg.cpu_binding_serving_cpus == cpu_binding.DEFAULT_SERVING_CPUS == 2
    with pytest.raises(ConfigError, match="cpu_binding_serving_cpus"):
        ClusterConfig.from_dict({"cpu_binding_serving_cpus": 0, "models": [{"name": "a", "path": "/x"}]})
    assert ClusterConfig.from_dict({"cpu_binding": "off", "models": [{"name": "a", "path": "/x"}]}).cpu_binding == "off"
    with pytest.raises(ConfigError, match="cpu_binding"):
        ClusterConfig.from_dict({"cpu_binding": "on", "models": [{"name": "a", "path": "/x"}]})


def test_each_placed_model_gets_its_cores_in_a_copy_of_the_config():
    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/x", "num_replicas": 1},
                                              {"name": "b", "path": "/y", "num_replicas": 2},
                                              {"name": "c", "path": "/z", "resources_per_shard": {"GPU": 1}}]})
    binding = cpu_binding.CpuBinding(serving=frozenset({0}), engines={"a": "5"}, floating={"b": "0-5"})
    out = cpu_binding.with_engine_cpu_cores(cfg, binding)
    assert [m.engine_cpu_cores for m in out.models] == ["5", "0-5", None]
    assert [m.engine_cpu_cores for m in cfg.models] == [None, None, None]  # the given config is not changed
    inactive = cpu_binding.CpuBinding(serving=frozenset({0}), unbound={"a": "why"}, active=False)
    assert cpu_binding.with_engine_cpu_cores(cfg, inactive) is cfg and cpu_binding.with_engine_cpu_cores(cfg, None) is cfg


def test_bind_this_process_moves_it_onto_the_serving_cpus():
    """In a child process (moving the test process would slow the rest of the suite). Its CPUs are this one's
    lowest plus a made-up one above it, which the plan gives the engine: the child ends up on the lowest."""
    code = """
import os
from cluster import cpu_binding
from cluster.config import ClusterConfig
low = min(os.sched_getaffinity(0))
cpu_binding.allowed_cpus = lambda: frozenset({low, low + 1000})
cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/x", "num_replicas": 1}]})
said = []
binding = cpu_binding.bind_this_process(cfg.models, "auto", 1, said.append)
print(sorted(os.sched_getaffinity(0)) == [low], binding.engine_cpu_cores == {"a": str(low + 1000)}, len(said))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "2"]  # the engine's line and the serving path's
