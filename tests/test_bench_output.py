"""What every `herd bench` scenario shares: one JSON document on stdout (or in --out), everything else on
stderr, and no generated checkpoint left behind (benchmarks/bench_common.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_only_the_report_reaches_stdout():
    proc = run_python("""
        import os, subprocess, sys
        from benchmarks.bench_common import stdout_reserved_for_report, write_json
        with stdout_reserved_for_report():
            print("INFO a stray print")                          # Python's stdout
            os.write(1, b"INFO a C library writing to fd 1\\n")   # the descriptor itself
            subprocess.run(["echo", "INFO a child process"])     # inherited by children (Ray's workers)
            write_json({"tokens_per_s": 1.5}, None)
        print("after")                                           # stdout is back
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == '{\n  "tokens_per_s": 1.5\n}\nafter\n'
    for line in ("INFO a stray print", "INFO a C library writing to fd 1", "INFO a child process"):
        assert line in proc.stderr


def test_report_goes_to_the_out_file_instead(tmp_path):
    proc = run_python(f"""
        from benchmarks.bench_common import stdout_reserved_for_report, write_json, write_report
        with stdout_reserved_for_report():
            write_json({{"a": 1}}, {str(tmp_path / "sub" / "a.json")!r})
            write_report({{"b": 2}}, {str(tmp_path / "dir")!r}, "b.json")
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"a": 1}
    assert json.loads((tmp_path / "dir" / "b.json").read_text()) == {"b": 2}
    assert f"wrote {tmp_path / 'sub' / 'a.json'}" in proc.stderr


def test_scratch_dir_is_removed_at_exit():
    proc = run_python("""
        from benchmarks.bench_common import scratch_dir
        d = scratch_dir()
        (d / "model.safetensors").write_bytes(b"x" * 1024)
        print(d)
    """)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip())
    assert folder.name.startswith("herd-bench-") and not folder.exists()


def test_herd_bench_prints_one_json_document():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "routing-sim", "--blocks", "2000",
                           "--requests", "200", "--replicas", "2", "--routers", "1", "--designs", "oracle", "filter"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)              # the whole of stdout is one document
    assert {r["design"] for r in report["runs"]} == {"oracle", "filter"}
    assert proc.stderr.count('"design"') == 2     # per-run progress went to stderr
