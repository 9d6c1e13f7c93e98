"""herd's modules log under `herd.*`, and in a Serve replica those records go where Serve's own go (cluster/logs.py)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("workers", "cluster", "benchmarks", "proto")


def module_loggers() -> list[tuple[str, str]]:
    """(file, source of the name argument) of every module-level `x = logging.getLogger(...)`."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                        and ast.unparse(node.value.func) == "logging.getLogger"):
                    arg = ast.unparse(node.value.args[0]) if node.value.args else "<root>"
                    found.append((str(path.relative_to(REPO)), arg))
    return found


def test_every_module_logger_is_under_herd():
    loggers = module_loggers()
    assert len(loggers) >= 10                      # the scan sees the modules that log
    wrong = [(f, arg) for f, arg in loggers if not (arg.startswith(("f'herd.", 'f"herd.', "'herd.", '"herd.')))]
    assert wrong == [], f"log under herd.<module>: logging.getLogger(f\"herd.{{__name__}}\"), not {wrong}"


def test_herd_records_reach_serves_handlers_at_serves_level():
    # As in a replica: only "ray.serve" has a handler (Serve's), at INFO, not propagating; the root logger is
    # left at WARNING with a handler of its own that must see nothing twice.
    code = textwrap.dedent("""
        import json, logging
        class Keep(logging.Handler):
            def __init__(self):
                super().__init__()
                self.records = []
            def emit(self, record):
                self.records.append([record.name, record.levelname, record.getMessage()])
        serve, root = Keep(), Keep()
        serve_logger = logging.getLogger("ray.serve")
        serve_logger.addHandler(serve)
        serve_logger.setLevel(logging.INFO)
        serve_logger.propagate = False
        logging.getLogger().addHandler(root)
        import cluster                                   # links "herd" below "ray.serve"
        logging.getLogger("herd.workers.engine").info("engine up")
        logging.getLogger("herd.cluster.ingress").debug("below Serve's level")
        logging.getLogger("herd.cluster.ingress").warning("careful")
        print(json.dumps({"serve": serve.records, "root": root.records}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["serve"] == [["herd.workers.engine", "INFO", "engine up"],
                             ["herd.cluster.ingress", "WARNING", "careful"]]
    assert seen["root"] == []


def test_the_herd_command_prints_herd_records_with_its_own_handler():
    code = textwrap.dedent("""
        import logging, sys
        import ray                                          # sets up Ray's "ray" logger (INFO, no propagation)
        from cluster import cli
        sys.argv = ["herd", "-v", "plan", "--shape", "llama2-70b", "--gpus-per-node", "8", "--gpu-memory", "80GiB"]
        cli.main(sys.argv[1:])
        logging.getLogger("herd.workers.engine").debug("a debug line")
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "DEBUG herd.workers.engine: a debug line" in proc.stderr
