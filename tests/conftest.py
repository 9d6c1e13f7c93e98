import os
import sys
import time

import pytest

from tests.process_hygiene import Leftovers, mark_descendants, owned_processes

# Tests never join a Ray cluster they did not start.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
# The tests' Ray clusters export metrics every 2 s instead of Ray's 10 s: the tests that read herd's series
# from the Prometheus endpoint wait for an export after their traffic (test_metrics: 31 s -> 13 s).
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
# Every process the tests start carries this process's mark (tests/process_hygiene.py).
mark_descendants()

_exit_status: int | None = None
_leftovers = Leftovers()
# A run that has gone on this long stops before its next test, printing what it has (CI gives `make test` 90
# minutes in all and prints only the end of its output; a healthy slow half takes ~10-15 minutes there).
SESSION_BUDGET_S = float(os.environ.get("HERD_TEST_BUDGET_S", 45 * 60))
_session_started = time.monotonic()


def pytest_runtest_setup(item):
    if time.monotonic() - _session_started > SESSION_BUDGET_S:
        pytest.exit(f"this test run passed its budget of {SESSION_BUDGET_S:.0f} s (HERD_TEST_BUDGET_S) before "
                    f"{item.nodeid}; stopping with what it has", returncode=1)


@pytest.fixture(scope="module", autouse=True)
def _module_leaves_nothing_running(request):
    """Set up before and torn down after every other fixture of the module: what the module started and did
    not end by then is ended here, and named in the run's summary."""
    running_before = {p.pid for p in owned_processes()}
    yield
    left = _leftovers.end_what_was_left(request.module.__name__, running_before)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if left and reporter is not None:
        reporter.write_line(f"\n{request.module.__name__} left {len(left)} process(es) running; ended them")


def pytest_runtest_logreport(report):
    """A failure's one-line reason as soon as it happens, not only in the summary at the end: a run that is
    stopped from outside (CI's time limit) still says what failed first."""
    if report.failed:
        last = (report.longreprtext.strip().splitlines() or ["?"])[-1]
        sys.stderr.write(f"\nFAILED {report.nodeid} ({report.when}): {last[:300]}\n")


def pytest_terminal_summary(terminalreporter):
    lines = _leftovers.summary_lines()
    if lines:
        terminalreporter.section("processes left running by test modules")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the test process with pytest's own status, skipping the interpreter's teardown. After a full run
    (1061 tests passed) the teardown of the native libraries loaded along the way (torch, Ray's core worker,
    llguidance's thread pool, Triton) once crashed the process with SIGSEGV, which turned a green run into
    exit 139. Every cluster a test starts is shut down by the test itself, so nothing is left for atexit
    hooks to do. HERD_TEST_NORMAL_EXIT=1 keeps the normal teardown (to look for that crash)."""
    if _exit_status is not None and os.environ.get("HERD_TEST_NORMAL_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status)
