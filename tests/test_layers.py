"""herd's layers (.importlinter) and the light start of the commands that need no model.

- the import-linter contracts hold: the engine (workers) imports neither serving (cluster) nor benchmarks,
  shard groups (workers.parallel) do not import serving, serving imports benchmarks only in cluster.cli;
- `herd --help`, `herd client --help`, `herd k8s --help` and `herd plan --shape ...` run without importing
  torch or Ray (how long they take is measured in docs/benchmarks.md, not asserted here);
- workers' public names still resolve, on first use.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray")


def test_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail(f"{lint} is missing: install the test extras (pip install -e '.[test]'), which pin import-linter")
    proc = subprocess.run([str(lint), "--config", str(REPO / ".importlinter")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def modules_loaded_by(argv: list[str]) -> dict:
    """Run `herd ARGV` in a fresh interpreter; its exit code and which heavy packages it imported."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from cluster.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                rc = main({argv!r})
            except SystemExit as e:           # --help exits 0 from argparse
                rc = e.code
        print(json.dumps({{"rc": rc, "output": out.getvalue(),
                          "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["client", "--help"],
    ["k8s", "--help"],
    ["k8s", "render", "--help"],
    ["plan", "--shape", "llama2-70b", "--gpus-per-node", "8", "--gpu-memory", "80GiB"],
], ids=" ".join)
def test_commands_that_need_no_model_import_neither_torch_nor_ray(argv):
    result = modules_loaded_by(argv)
    assert result["rc"] == 0, result
    assert result["output"].strip(), "the command printed nothing"
    assert result["heavy"] == [], f"herd {' '.join(argv)} imported {result['heavy']}"


def test_a_client_call_imports_neither_torch_nor_ray():
    # A real call (to a port nobody listens on: it fails fast), not only --help.
    result = modules_loaded_by(["client", "models", "--address", "127.0.0.1:1", "--timeout", "5"])
    assert result["rc"] == 1, result
    assert result["heavy"] == []


def test_a_model_command_does_load_the_engine():
    # The check above can fail: the same probe sees torch once a command that needs it has run.
    code = "import sys, workers; workers.Engine; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


def test_workers_exports_resolve_on_first_use():
    import workers
    from workers.engine import Engine
    from workers.errors import HerdError

    assert workers.Engine is Engine and workers.HerdError is HerdError
    assert {"Engine", "AsyncEngine", "SamplingParams", "Tokenizer", "ModelConfig"} <= set(workers.__all__)
    assert set(workers.__all__) <= set(dir(workers))
    for name in workers.__all__:
        assert getattr(workers, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        workers.Engin


def test_the_ingress_checks_requests_without_importing_torch():
    """The ingress validates sampling (with a grammar) and chat tools through the light modules: importing torch
    there added ~100k objects after the ingress froze its start-up ones (workers.gc_freeze), and each full
    garbage collection walked them again (163-176 ms pauses under overload)."""
    code = textwrap.dedent("""
        import asyncio, json, sys
        from cluster.chat_tools import ChatTools
        from cluster.ingress import Frontend

        async def main():
            fe = Frontend({}, {})
            checked = await fe.check_sampling({"max_tokens": 4, "temperature": 0.5,
                                               "structured": {"regex": "[ab]+"}})
            tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            tools = await ChatTools.checked([tool], "required", fe.limits)
            return checked, tools

        checked, tools = asyncio.run(main())
        print(json.dumps({"structured": checked.get("structured"), "tools": bool(tools.constrain({})),
                          "torch": "torch" in sys.modules}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["structured"] == {"regex": "[ab]+"} and result["tools"]
    assert result["torch"] is False
