"""Ray's own background processes at the lowest CPU priority, in a Ray that herd starts itself.

Ray runs its workers (Serve's proxy, the ingress, the model replicas and their engine processes) 15 niceness
steps below its own processes, which keep the niceness Ray was started with (0 usually), so that the raylet and
the GCS, which schedule and supervise everything, always get the CPU. That also holds for the processes that
take no part in serving a request: the dashboard (and the modules it forks), the dashboard agent (which
collects every process's stats and exports the metrics), the runtime-env agent, the log monitor and the
autoscaler's monitor. Their periodic bursts then preempt every
serving process: on 2 vCPUs with the serving path on one core (`cpu_binding_serving_cpus: 1`), the dashboard
agent took ~240 ms of CPU in one burst during an overload run, every refusal behind it waited, and the
sustained refusals' p99 was 250-365 ms in four runs; with the agent at niceness 19, 29-38 ms in three
(`herd bench load --concurrency 1 --skip-in-process --overload --cpu-binding-serving-cpus 1`, docs/serving.md
"Dedicated engine cores").

So `start_local_ray` moves them to BACKGROUND_NICENESS, every thread of each (Linux's niceness is a thread's,
and a thread or process they start later inherits it from its creator). The GCS and the raylet keep theirs. A
joined cluster (`herd serve --address`, KubeRay) starts its Ray processes itself, and this does nothing there.
Raising a niceness needs no privilege; nothing here lowers one.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

log = logging.getLogger("herd.background_priority")

BACKGROUND_NICENESS = 19
# Script paths in the command line of Ray's agents, before they name themselves ray::DashboardAgent and
# ray::RuntimeEnvAgent (the raylet starts them, so they are not in the node's own process table).
_AGENT_SCRIPTS = ("dashboard/agent.py", "runtime_env/agent/main.py")


def background_pids() -> list[int]:
    """The pids of the local Ray node's background processes (and their descendants), as this driver started
    them; [] without a local node."""
    import psutil
    import ray
    from ray._private import ray_constants as rc

    node = ray._private.worker._global_node
    if node is None:
        return []
    roots: list[psutil.Process] = []
    for kind in (rc.PROCESS_TYPE_DASHBOARD, rc.PROCESS_TYPE_LOG_MONITOR, rc.PROCESS_TYPE_MONITOR):
        for info in node.all_processes.get(kind, ()):
            roots.append(psutil.Process(info.process.pid))
    for info in node.all_processes.get(rc.PROCESS_TYPE_RAYLET, ()):
        for child in psutil.Process(info.process.pid).children():
            if _is_agent(child, rc.AGENT_PROCESS_LIST):
                roots.append(child)
    pids: list[int] = []
    for proc in roots:
        try:
            pids += [proc.pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.Error:
            continue
    return pids


def _is_agent(proc, names: Iterable[str]) -> bool:
    import psutil

    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(name in cmdline for name in names) or any(script in cmdline for script in _AGENT_SCRIPTS)


def lower_priority(pids: Iterable[int], niceness: int = BACKGROUND_NICENESS) -> int:
    """Every thread of these processes to at least `niceness`; returns how many threads moved. A process or
    thread that ended meanwhile is skipped."""
    moved = 0
    for pid in pids:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:  # gone, or no procfs (macOS: a process has one niceness)
            tids = [pid]
        for tid in tids:
            try:
                if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                    os.setpriority(os.PRIO_PROCESS, tid, niceness)
                    moved += 1
            except OSError:
                continue
    return moved


def lower_background_priority(niceness: int = BACKGROUND_NICENESS) -> list[int]:
    """Ray's background processes of the local node to `niceness`; returns their pids."""
    try:
        pids = background_pids()
    except Exception:  # noqa: BLE001 - a Ray without this process table: serving works, only less evenly
        log.warning("could not find Ray's background processes; their priority is left as Ray set it",
                    exc_info=True)
        return []
    threads = lower_priority(pids, niceness)
    log.debug("Ray's background processes (%d, %d threads) at niceness %d", len(pids), threads, niceness)
    return pids
