"""Dedicated CPU cores for an engine process: `engine_cpu_cores: "2-7"` (a model key).

On a CPU host the engine's step loop competes with the serving path (Serve's proxy, the ingress, the replica:
short bursts of work per streamed message) for the same cores, and the scheduler hands those bursts the core
the engine was on: at 64 streams on 2 vCPUs the engine process got 0.6-0.7 of a core while busy 100% of the
time (docs/serving.md). Pinning the engine process to cores of its own, and the rest of the node to the
others (`taskset -c 0 herd serve ...`, or the pod's cpuset), gives the engine whole cores, as vLLM's CPU
backend binds its OpenMP threads (VLLM_CPU_OMP_THREADS_BIND). On GPU nodes the engine's host thread is
rarely starved and this stays off (the default).

The list is Linux's cpu-list syntax (taskset -c, cpuset.cpus): "3", "0,2", "4-7", "0-1,6". A process may
move to any CPU its cgroup allows, whatever its parent's affinity, so the engine can leave a `taskset`
that confines the serving path.
"""
from __future__ import annotations

import os

from .errors import SettingError


def parse_cpu_list(text: str) -> frozenset[int]:
    """"0-1,6" -> {0, 1, 6}; a malformed list raises ValueError naming the part."""
    cpus: set[int] = set()
    for part in str(text).replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{part!r} is not a CPU number or range (e.g. 3, 0,2 or 4-7)")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"range {part!r} runs backwards")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def pin_this_process(cpu_list: str) -> frozenset[int]:
    """Move every thread of this process (and the threads it starts later) onto `cpu_list`'s CPUs. Raises
    SettingError when a CPU is not one this process may run on."""
    try:
        cpus = parse_cpu_list(cpu_list)
    except ValueError as e:
        raise SettingError(f"engine_cpu_cores: {e}") from None
    existing = frozenset(range(os.cpu_count() or 1))
    if not cpus <= existing:
        raise SettingError(f"engine_cpu_cores {cpu_list!r} names CPUs {_format(cpus - existing)} that this "
                           f"node does not have (it has {_format(existing)})")
    # sched_setaffinity(0) moves the calling thread only; threads already running (a library's pool) move one
    # by one, and threads started later inherit the affinity of the thread that starts them.
    for tid in _thread_ids():
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
        except OSError as e:  # EINVAL: none of them is in the cpuset of this container / cgroup
            raise SettingError(f"engine_cpu_cores {cpu_list!r}: this process may not run there ({e})") from None
    return cpus


def _thread_ids() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]


def _format(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))
