"""The test suite's own guard against leftover processes (tests/process_hygiene.py): it ends what this test
process started and left running, and nothing else."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.process_hygiene import OWNER_ENV, Leftovers, owned_processes

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def test_a_marked_leftover_is_ended_and_named_and_an_unmarked_one_is_left_alone():
    running_before = {p.pid for p in owned_processes()}
    marked = subprocess.Popen(SLEEPER)                       # inherits this process's mark
    foreign = subprocess.Popen(SLEEPER, env={k: v for k, v in os.environ.items() if k != OWNER_ENV})
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    try:
        assert marked.pid in {p.pid for p in owned_processes()}
        assert foreign.pid not in {p.pid for p in owned_processes()}
        leftovers = Leftovers()
        described = leftovers.end_what_was_left("some_module", running_before, grace_s=0.5)
        assert [d.split()[0] for d in described] == [str(marked.pid)]
        assert marked.wait(timeout=10) is not None              # ended
        assert foreign.poll() is None                            # still running
        assert leftovers.summary_lines()[0].startswith("some_module: 1 process(es) still running")
        assert Leftovers().end_what_was_left("other", running_before | {marked.pid}, grace_s=0) == []
    finally:
        for proc in (marked, foreign):
            proc.kill()
            proc.wait()


def test_processes_running_before_the_module_are_not_its_leftovers():
    before = subprocess.Popen(SLEEPER)
    try:
        running_before = {p.pid for p in owned_processes()}
        assert Leftovers().end_what_was_left("m", running_before, grace_s=0) == []
        assert before.poll() is None
    finally:
        before.kill()
        before.wait()


def test_multiprocessings_resource_tracker_is_not_a_leftover():
    """It serves the whole test process once started; ending it makes multiprocessing warn and relaunch it."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    tracker = resource_tracker._resource_tracker._pid
    assert tracker and tracker not in {p.pid for p in owned_processes()}
    running_before = {p.pid for p in owned_processes()}
    assert Leftovers().end_what_was_left("m", running_before, grace_s=0) == []
    os.kill(tracker, 0)                                          # still running
