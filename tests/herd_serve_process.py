"""A real `herd serve` in its own process, as an operator runs it: started on free ports and read until its
summary, then stopped with Ctrl-C (tests/test_serve_startup.py, tests/test_joined_serve.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

from tests.serve_fixtures import START_ATTEMPTS, free_port

SUMMARY_END = "Ctrl-C stops"   # the summary's last line


def start_herd_serve(config, *extra_args: str, env: dict[str, str] | None = None):
    """`herd serve CONFIG EXTRA_ARGS` on free ports until its summary is printed: (process, its output lines
    so far and to come, the reader thread, gRPC port, HTTP port). A start whose proxy port was taken between
    free_port() and Serve's bind (one of the many ports Ray's own processes open meanwhile) is retried on new
    ports, as tests/serve_fixtures.py does; a process that ends without its summary fails at once."""
    for attempt in range(1, START_ATTEMPTS + 1):
        grpc_port, http_port = free_port(), free_port()
        proc, lines, reader, summary = run_herd_serve(config, "--grpc-port", str(grpc_port), "--http-port",
                                                      str(http_port), *extra_args, env=env)
        if summary:
            return proc, lines, reader, grpc_port, http_port
        stop_herd_serve(proc, reader)
        if attempt == START_ATTEMPTS or not any("Failed to bind" in ln for ln in lines):
            raise AssertionError("no summary within 300 s:\n" + "\n".join(lines))
    raise AssertionError("unreachable")


def run_herd_serve(config, *args: str, timeout_s: float = 300, env: dict[str, str] | None = None):
    """`herd serve CONFIG ARGS` until its summary is printed or it ends: (process, its output lines so far and
    to come, the reader thread, whether the summary came). env: more environment variables (its local Ray's
    processes inherit them)."""
    env = {**os.environ, "RAY_ENABLE_AUTO_CONNECT": "0", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", str(config), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    summary, done = threading.Event(), threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == SUMMARY_END:
                summary.set()
                done.set()
        done.set()  # the output ended: the process is gone
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    done.wait(timeout_s)
    return proc, lines, reader, summary.is_set()


def stop_herd_serve(proc, reader) -> None:
    """Ctrl-C, as an operator stops it (a kill only if it has not ended 120 s later)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    reader.join(timeout=10)
