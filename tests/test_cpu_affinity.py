"""engine_cpu_cores: the cpu-list syntax, the config's checks, and a process moving every thread it has."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster.config import ClusterConfig, ConfigError
from workers.cpu_affinity import parse_cpu_list


@pytest.mark.parametrize("text, cpus", [("3", {3}), ("0,2", {0, 2}), ("4-7", {4, 5, 6, 7}),
                                        ("0-1, 6", {0, 1, 6}), ("2-2", {2})])
def test_cpu_lists(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text, part", [("", "''"), ("a", "'a'"), ("1-", "'1-'"), ("-3", "'-3'"),
                                        ("5-2", "runs backwards"), ("1,,2", "''"), ("1.5", "'1.5'")])
def test_malformed_cpu_lists_name_the_part(text, part):
    with pytest.raises(ValueError, match=part):
        parse_cpu_list(text)


def _model(**kw) -> dict:
    return {"name": "m", "path": "/ckpt", "resources_per_shard": {"CPU": 1}, **kw}


def test_the_config_checks_engine_cpu_cores():
    cfg = ClusterConfig.from_dict({"models": [_model(engine_cpu_cores="1-3")]})
    assert cfg.models[0].engine_cpu_cores == "1-3"
    for bad, message in [(_model(engine_cpu_cores="1-x"), "not a CPU number or range"),
                         (_model(engine_cpu_cores="1", engine_process=False), "needs engine_process true"),
                         (_model(engine_cpu_cores="1", tensor_parallel_size=2), "needs engine_process true")]:
        with pytest.raises(ConfigError, match=message):
            ClusterConfig.from_dict({"models": [bad]})


def test_pinning_moves_threads_started_before_and_after():
    """In a child process (pinning this test process would slow the rest of the suite)."""
    target = max(os.sched_getaffinity(0))
    code = f"""
import os, threading, time
from workers.cpu_affinity import pin_this_process
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
assert pin_this_process("{target}") == {{{target}}}
after = threading.Thread(target=stop.wait); after.start()
time.sleep(0.1)
print(sorted({{frozenset(os.sched_getaffinity(int(t))) == {{{target}}} for t in os.listdir("/proc/self/task")}}))
stop.set()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True]"  # every thread, the one started before included
