"""What a test module left running is ended before the next module starts, and named in the run's summary.

Every process a test process starts, and every process those start in turn (Ray's GCS and raylet, its workers,
a replica's engine process, a `herd serve` subprocess and its own Ray), inherits OWNER_ENV = the test process's
pid. Each module's fixtures shut down what they started, so once a module's last teardown has run, nothing
carrying this process's mark should be running. Something that is (a Ray whose shutdown failed halfway, a
worker whose raylet died under it) would otherwise go on taking CPU, memory, shared memory and ports from
every later module: the CI run of stop 21 had one module fail and every cluster start after it time out,
until the run as a whole ran out of time.

The mark, not a name, decides what is ended: only processes this test process started, directly or not, never
another user's Ray on the same machine. Processes that were already running when the module began are left
alone, and so are multiprocessing's resource tracker and fork server, which serve the whole test process once
started (known by the pids multiprocessing keeps, not by name). No fixture wider than a module starts a process."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import psutil

OWNER_ENV = "HERD_TEST_OWNER"
# ray.shutdown() returns before the workers it ended have exited: they notice their raylet is gone and leave
# on their own, within a few seconds. Only what is still running after this grace is a leftover.
EXIT_GRACE_S = 15.0
TERMINATE_WAIT_S = 10.0


def mark_descendants() -> None:
    """From now on every process this one starts carries its mark (set per process: an xdist worker marks
    its own, not its controller's)."""
    os.environ[OWNER_ENV] = str(os.getpid())


def _session_helpers() -> set[int]:
    """multiprocessing's resource tracker and fork server of this process, if started."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(resource_tracker._resource_tracker, "_pid", None),
            getattr(forkserver._forkserver, "_forkserver_pid", None)}
    return {pid for pid in pids if pid}


def owned_processes() -> list[psutil.Process]:
    """Running processes that carry this process's mark (this process, its session helpers and zombies, which
    have exited, excluded)."""
    me, mine = os.getpid(), str(os.getpid())
    skip = {me} | _session_helpers()
    found = []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        with contextlib.suppress(psutil.Error):   # gone meanwhile, or another user's (unreadable): not ours
            if proc.environ().get(OWNER_ENV) == mine and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


@dataclass
class Leftovers:
    """The processes each module left running, by module, for the run's summary."""
    by_module: dict[str, list[str]] = field(default_factory=dict)

    def end_what_was_left(self, module: str, running_before: set[int],
                          grace_s: float = EXIT_GRACE_S) -> list[str]:
        """After `module`'s last teardown: wait `grace_s` for its marked processes to exit, then end the rest
        (SIGTERM, then SIGKILL) and record them. Returns their descriptions."""
        deadline = time.monotonic() + grace_s
        while (left := [p for p in owned_processes() if p.pid not in running_before]) and \
                time.monotonic() < deadline:
            time.sleep(0.25)
        if not left:
            return []
        described = [_describe(p) for p in left]
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(left, timeout=TERMINATE_WAIT_S)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)
        self.by_module[module] = described
        return described

    def summary_lines(self) -> list[str]:
        lines = []
        for module, described in self.by_module.items():
            lines.append(f"{module}: {len(described)} process(es) still running after its teardown, ended:")
            lines += [f"  {d}" for d in described]
        return lines
