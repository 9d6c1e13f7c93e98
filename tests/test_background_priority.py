"""cluster.background_priority.lower_priority: every thread of a process to the given niceness, never down."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from cluster.background_priority import lower_priority

# A child with a second thread, both asleep; it prints once both exist.
_CHILD = """
import threading, time, sys
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
print("ready", flush=True)
time.sleep(60)
"""


def _niceness(pid: int) -> list[int]:
    return sorted(os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f"/proc/{pid}/task"))


def test_every_thread_moves_and_none_moves_back():
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        base = os.getpriority(os.PRIO_PROCESS, child.pid)
        assert len(_niceness(child.pid)) == 2 and base < 19
        assert lower_priority([child.pid], 19) == 2
        assert _niceness(child.pid) == [19, 19]
        assert lower_priority([child.pid], base) == 0  # never lowered (that would need a privilege)
        assert _niceness(child.pid) == [19, 19]
    finally:
        child.kill()
        child.wait()
    time.sleep(0.05)
    assert lower_priority([child.pid], 19) == 0  # a process that ended is skipped
