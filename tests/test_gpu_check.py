"""benchmarks/gpu_check.py (`make gpu-check`): its CPU dry run end to end, and the arithmetic its verdicts rest on.

The figures only mean something on a GPU; here the script itself is exercised, so that a GPU session runs a
script that works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check as gc
from workers.parallel.plan import shape_config

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_writes_the_report(tmp_path):
    """`--device cpu --quick`: correctness checks, decode and prefill timings on both paths, JSON and PNG."""
    env = dict(os.environ, RAY_ENABLE_AUTO_CONNECT="0")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "errors" not in report and not any(isinstance(v, dict) and "error" in v for v in report.values())
    greedy = report["greedy_vs_reference"]
    assert greedy["all_equal"], greedy
    assert {c["reference"] for c in greedy["checkpoints"]} == {"transformers"}
    agreement = report["bf16_agreement"]
    for part in ("prefill", "decode"):
        assert agreement[part]["top1_agreement"] >= 0.9
        assert 0 <= agreement[part]["logprob_abs_err_mean"] < 0.05
    assert report["graphs_vs_eager"] == {"skipped": "CUDA graphs need CUDA"}
    assert report["memory_sizing"] == {"skipped": "sizing from the device's memory needs CUDA"}
    cases = {(r["shape"], r["path"], r["batch"], r["context"]) for r in report["decode"]}
    plan = report["plan"]
    # the first shape on 3 paths (graphs, eager Triton, portable), the second on 2
    assert len(cases) == (3 + 2) * len(plan["batches"]) * len(plan["contexts"])
    assert {r["path"] for r in report["decode"] if r["shape"] == "tiny-gqa"} == {"triton", "triton-eager", "portable"}
    assert {s["why"] for s in report["skipped"] if s["path"] == "triton-fp8"} == {"the fp8 KV cache needs CUDA"}
    for r in report["decode"]:
        assert r["step_ms"] > 0 and r["bound_ms"] > 0
        assert r["fraction_of_bound"] == pytest.approx(r["bound_ms"] / r["step_ms"])
    assert all("speedup_vs_portable" in r for r in report["decode"] if r["path"] != "portable")
    assert all("speedup_vs_eager" in r for r in report["decode"] if r["path"] == "triton" and r["shape"] == "tiny-gqa")
    assert not any(r["backends"]["cuda_graphs"] for r in report["decode"])     # CPU: no graphs
    assert {(p["shape"], p["path"]) for p in report["prefill"]} == {
        ("tiny-gqa", "triton"), ("tiny-gqa", "triton-eager"), ("tiny-gqa", "portable"), ("tiny-mha", "triton"),
        ("tiny-mha", "portable")}
    assert set(report["targets"]) >= {"decode_batch1_half_of_hbm_bound", "prefill_40pct_of_peak"}
    assert report["png"] == "gpu_check.png" and (tmp_path / "gpu_check.png").stat().st_size > 10_000


def test_engine_path_imports_without_serving_packages():
    """What gpu-check imports from workers/ needs neither Ray nor gRPC nor FastAPI (a GPU machine has none)."""
    code = ("import sys\n"
            "for m in ('ray', 'grpc', 'fastapi', 'kubernetes', 'llguidance'):\n"
            "    sys.modules[m] = None  # any import of them fails\n"
            "import importlib\n"
            "from benchmarks.gpu_check import ENGINE_MODULES\n"
            "for m in ENGINE_MODULES + ('tests.checkpoints',):\n"
            "    importlib.import_module(m)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_wheel_list_names_what_a_gpu_machine_may_lack():
    lines = gc.wheel_requirements()
    names = {line.split("==")[0].lower().replace("_", "-") for line in lines}
    assert {"safetensors", "tqdm", "pydantic", "pydantic-core"} <= names        # pydantic: EngineConfig
    assert not names & {"torch", "triton", "ray", "grpcio", "sympy", "filelock"}   # the machine's PyTorch brings those
    assert all("==" in line for line in lines)


def test_device_table_rows():
    assert gc.table_row("NVIDIA H200")[1] == 4.8e12
    assert gc.table_row("NVIDIA H100 PCIe")[0] == "NVIDIA H100 PCIe"
    assert gc.table_row("NVIDIA H100 80GB HBM3")[0] == "NVIDIA H100 SXM"
    assert gc.table_row("NVIDIA A100-SXM4-80GB")[0] == "NVIDIA A100 80GB"
    assert gc.table_row("NVIDIA L4")[0] == "NVIDIA L4"
    assert gc.table_row("Some Other Card") is None


def test_decode_step_gives_each_sequence_its_own_blocks():
    step = gc.decode_step(batch=3, context=40, block_size=16, vocab=100)
    assert step.num_decode == 3 and step.sample_indices == [0, 1, 2]
    assert step.decode_block_tables == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert step.positions == [39] * 3 and step.decode_seq_lens == [40] * 3
    assert step.slot_mapping == [2 * 16 + 7, 5 * 16 + 7, 8 * 16 + 7]   # position 39: third block, offset 7
    pre = gc.prefill_step(tokens=20, block_size=16, vocab=100, all_logits=True)
    assert pre.prefills == [(0, 20, 20, [0, 1])] and pre.sample_indices == list(range(20))
    assert pre.slot_mapping == list(range(20))


def test_bounds_arithmetic_matches_the_parameter_count():
    cfg = shape_config("llama3-8b")[1]
    # Weight bytes of a decode step: every parameter but the input embedding (only the batch's rows are read).
    weight_bytes = gc.decode_bytes(cfg, batch=1, context=0, elem_bytes=2)
    assert weight_bytes == 2 * (cfg.num_params - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size)
    # 8B: 32 layers x 8 kv heads x 128 dims x K and V x 2 bytes = 128 KiB of KV a token.
    assert gc.kv_bytes_per_token(cfg, 2) == 128 * 1024
    assert gc.decode_bytes(cfg, 16, 4096, 2) - gc.decode_bytes(cfg, 16, 0, 2) == 16 * 4096 * 128 * 1024 + 0
    fp8 = gc.decode_bytes(cfg, 16, 4096, 2, kv_elem_bytes=1) - gc.decode_bytes(cfg, 16, 0, 2, kv_elem_bytes=1)
    assert fp8 * 2 == 16 * 4096 * 128 * 1024                     # an fp8 cache: half the KV bytes
    flops = gc.prefill_flops(cfg, 2048)
    dense = 2 * 2048 * cfg.num_hidden_layers * gc.layer_params(cfg)
    assert dense < flops < dense * 1.2           # causal attention adds a few percent at 2k tokens


def test_targets_are_judged_only_where_measured():
    rows = [dict(shape="m", path="triton", batch=1, context=512, fraction_of_bound=0.6),
            dict(shape="m", path="triton", batch=1, context=4096, fraction_of_bound=0.4),
            dict(shape="m", path="triton", batch=64, context=512, fraction_of_bound=0.3, speedup_vs_portable=6.0)]
    prefill = [dict(shape="m", path="triton", fraction_of_peak=0.45)]
    t = gc.judge_targets(rows, prefill, "m")
    assert t == {"decode_batch1_half_of_hbm_bound": False, "decode_batch16_half_of_hbm_bound": None,
                 "decode_batch64_5x_portable": True, "prefill_40pct_of_peak": True}


def test_a_failing_part_is_recorded_and_the_rest_runs(tmp_path, monkeypatch):
    """On a GPU session every minute counts: a part that raises leaves its error in the JSON, not a crash."""
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")
    monkeypatch.setattr(gc, "check_bf16_agreement", broken)
    monkeypatch.setattr(gc, "time_shape", broken)
    monkeypatch.setattr(gc, "check_greedy", lambda *a: {"all_equal": True, "checkpoints": []})
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["bf16_agreement"]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "Traceback" in report["bf16_agreement"]["traceback"]
    assert set(report["errors"]) == {"timing tiny-gqa", "timing tiny-mha"}
    assert report["measured_ceilings"]["copy_bytes_per_s"] > 0 and report["decode"] == []
    assert report["png"] is None and report["png_skipped"] == "no decode step was timed"
