"""Starting a local Ray node with one more try when it does not come up.

`ray.init` waits a fixed 30 s for the new raylet to register with the GCS ("The current node timed out during
startup"), and 30 s for the GCS to publish its port ("Timed out waiting for file .../gcs_server_port_..."). On
a loaded 2-core machine either can fail although nothing is wrong with the options: the first failed a full
test run (test_metrics, CI of stop 17), the second test_serve_load's start in stop 30 and `herd bench load`'s
in stop 32, each with the session's log directory empty (the GCS never wrote a line), and the same start
passed when run again. `herd serve`, the benchmarks and the tests all start their Ray through here.

A start that fails that way is retried once; the processes the failed start left behind (GCS, raylet, reaper:
children of this process that ray.shutdown cannot reach, because ray.init raised before it recorded its node)
are ended first. Only this process's own new children are ended, never a process found by name.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

logger = logging.getLogger(f"herd.{__name__}")

ATTEMPTS = 2
# The raylet's registration timeout, and the GCS's (its port file not written within
# RAY_gcs_server_port_wait_time_s).
_STARTUP_FAILURES = ("timed out during startup", "Timed out waiting for file")


def is_startup_failure(error: BaseException) -> bool:
    """`error` is Ray's node-start timeout (worth a second start), not a mistake in the caller's options."""
    return any(text in str(error) for text in _STARTUP_FAILURES)


def start_with_retry(start: Callable[[], None], attempts: int = ATTEMPTS) -> None:
    """Call `start()` (a ray.init, or start_local_ray); after a node-start timeout, end what it left and call
    it again (at most `attempts` calls). `start` is called anew each time, so it may choose new ports."""
    for attempt in range(1, attempts + 1):
        try:
            with _new_children_ended_on_failure():
                start()
            return
        except Exception as e:  # noqa: BLE001 - only a node-start timeout is retried
            if attempt == attempts or not is_startup_failure(e):
                raise
            logger.warning("the local Ray node did not start (%s); its processes were ended, starting it again",
                           str(e).splitlines()[0][:200])


def init_local_ray(**init_kwargs) -> None:
    """ray.init(**init_kwargs), retried once after a node-start timeout."""
    import ray

    start_with_retry(lambda: ray.init(**init_kwargs))


@contextlib.contextmanager
def _new_children_ended_on_failure() -> Iterator[None]:
    import psutil
    import ray

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            ray.shutdown()
        left = [p for p in me.children(recursive=True) if p.pid not in before]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(left, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=5)
        raise
