"""`make gpu-check`: the CUDA path measured on one GPU, with nothing but the machine's own PyTorch and Triton.

    python -m benchmarks.gpu_check [--out DIR] [--quick] [--device cuda|cpu] [--hbm-tb-s X] [--peak-tflops Y]

It runs on a GPU node as it is: no Ray, none of herd's pins, no network. `workers/` imports without Ray; the
few other packages the engine path needs (safetensors, tqdm, ...) are usually on such a machine already, and
when one is missing the script installs it from `.gpu-wheels/` (`make gpu-wheels` downloads them here, and
the folder travels with the tree) with `pip --no-index --no-deps` into a scratch folder.

What it does, in about 8 minutes on one H200 (`--budget-s` stops the timings early, most important first):
1. Correctness on the device: greedy tokens of the tiny test checkpoints in fp32 against transformers (when
   transformers is absent: the Triton path against the portable torch path, and the JSON says so); bf16
   against fp32 on a random checkpoint shaped like Llama 3.2 1B (top-1 agreement, logprob error).
2. Speed on random bf16 weights shaped like Llama 3.1 8B, Llama 3.2 1B and a few layers of Llama 3.1 70B:
   decode step time at batch 1/16/64/256 with 512 and 4096 tokens of context, prefill tokens/s of a
   2k-token prompt, each through the engine's `ModelRunner.execute` (host-side step preparation included),
   next to its bound (weight + KV bytes read / HBM bandwidth; FLOPs / bf16 peak) and next to the portable
   path (HERD_TRITON_ATTENTION=0 HERD_TRITON_LAYER_OPS=0) on the same GPU.
3. One JSON (gpu_check.json) and one PNG (gpu_check.png, when matplotlib imports) in --out.

`--device cpu --quick` is a dry run with tiny shapes (tests/test_gpu_check.py runs it on every `make test`):
it exercises every line above except what needs CUDA, and its figures mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.bench_args import non_negative_float, positive_float

WHEEL_DIR = Path(__file__).resolve().parent.parent / ".gpu-wheels"
SCRATCH_SITE = Path(tempfile.gettempdir()) / "herd-gpu-site"
# The paths compared, as the switches the runner reads when it picks its backends and captures its graphs.
PATHS = {
    "triton": {"HERD_TRITON_ATTENTION": "1", "HERD_TRITON_LAYER_OPS": "1", "HERD_CUDA_GRAPHS": "1"},
    "triton-eager": {"HERD_TRITON_ATTENTION": "1", "HERD_TRITON_LAYER_OPS": "1", "HERD_CUDA_GRAPHS": "0"},
    "portable": {"HERD_TRITON_ATTENTION": "0", "HERD_TRITON_LAYER_OPS": "0", "HERD_CUDA_GRAPHS": "0"},
}
PATHS["triton-fp8"] = PATHS["triton"]               # with kv_cache_dtype fp8 (CUDA only)
FP8_PATHS = {"triton-fp8"}

# (name fragments, label, HBM bytes/s, dense bf16 FLOP/s): vendors' datasheet figures. The first row whose
# fragments all appear in torch.cuda.get_device_name() applies, so the more specific rows come first.
DEVICE_TABLE = [
    (("H200",), "NVIDIA H200", 4.8e12, 989e12),
    (("H100", "PCIe"), "NVIDIA H100 PCIe", 2.0e12, 756e12),
    (("H100", "NVL"), "NVIDIA H100 NVL", 3.9e12, 835e12),
    (("H100",), "NVIDIA H100 SXM", 3.35e12, 989e12),
    (("GH200",), "NVIDIA GH200", 4.0e12, 989e12),
    (("A100", "80GB"), "NVIDIA A100 80GB", 2.039e12, 312e12),
    (("A100",), "NVIDIA A100 40GB", 1.555e12, 312e12),
    (("L40S",), "NVIDIA L40S", 0.864e12, 362e12),
    (("L4",), "NVIDIA L4", 0.3e12, 121e12),
    (("A10",), "NVIDIA A10", 0.6e12, 125e12),
]

# The targets issue 11 set for the 8B shape.
TARGET_DECODE_BOUND_FRACTION = 0.5     # at batch 1 and 16
TARGET_DECODE_SPEEDUP = 5.0            # over the portable path at batch 64
TARGET_PREFILL_PEAK_FRACTION = 0.4     # at 2k tokens


# ---- running on a bare GPU machine ------------------------------------------------------------------------
def import_engine_modules() -> list[str]:
    """Import what the check needs from workers/; when a package is missing on this machine, the wheels in
    WHEEL_DIR of every distribution not installed here go into a scratch folder (once) and the import is
    retried. Returns the wheels installed that way."""
    installed: list[str] = []
    while True:
        try:
            for name in ENGINE_MODULES:
                importlib.import_module(name)
            return installed
        except ModuleNotFoundError as e:
            wheels = [w for w in sorted(WHEEL_DIR.glob("*.whl")) if not _is_installed(w.name.split("-")[0])]
            if installed or not wheels:
                raise SystemExit(f"gpu-check: module {e.name!r} is missing here; run `make gpu-wheels` on a machine "
                                 f"with network and carry {WHEEL_DIR.name}/ with the tree") from e
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--upgrade", "--target", str(SCRATCH_SITE), *map(str, wheels)], check=True)
            sys.path.insert(0, str(SCRATCH_SITE))
            importlib.invalidate_caches()
            installed = [w.name for w in wheels]


def _is_installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# What the check imports from the tree (the engine path, the Triton kernels, the shapes, the tiny checkpoints).
ENGINE_MODULES = ("workers.engine", "workers.model_runner", "workers.demo", "workers.parallel.plan",
                  "workers.parallel.distributed", "workers.triton_attention", "workers.triton_layer_ops")


def wheel_requirements() -> list[str]:
    """`name==version` of every installed distribution the check's imports pull in, beyond the standard
    library, PyTorch and what PyTorch itself requires (a GPU machine has those): what `make gpu-wheels`
    downloads. Read from this environment, so the versions are the ones herd is tested with; the imports
    are made in a fresh interpreter, so what this process imported already does not hide any."""
    code = ("import importlib, sys\n"
            f"for m in {ENGINE_MODULES!r}:\n"
            "    importlib.import_module(m)\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    top_level = set(proc.stdout.split())
    dists = importlib.metadata.packages_distributions()
    provided_by_torch = {"torch", "triton"} | _requirement_closure("torch")
    wanted = set()
    for module in top_level - set(sys.stdlib_module_names) - {"workers", "benchmarks", "tests"}:
        for dist in dists.get(module, ()):
            if _canonical(dist) not in provided_by_torch:
                wanted.add(dist)
    return sorted(f"{d}=={importlib.metadata.version(d)}" for d in wanted)


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def _requirement_closure(dist: str) -> set[str]:
    seen, todo = set(), [dist]
    while todo:
        try:
            reqs = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in reqs:
            if "extra ==" in req:
                continue
            name = _canonical(req.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0]
                              .split("~")[0].strip())
            if name and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


# ---- the device's ceilings --------------------------------------------------------------------------------
@dataclasses.dataclass
class Ceilings:
    device_name: str
    label: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float
    source: str             # "table", "flags" or "none" (CPU dry run: nominal figures)


def table_row(device_name: str) -> tuple[str, float, float] | None:
    """(label, HBM bytes/s, bf16 FLOP/s) of the first DEVICE_TABLE row matching the name, or None."""
    for fragments, label, bw, peak in DEVICE_TABLE:
        if all(f in device_name for f in fragments):
            return label, bw, peak
    return None


def device_ceilings(device: torch.device, hbm_tb_s: float | None, peak_tflops: float | None) -> Ceilings:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    label, bw, peak, source = name, None, None, "none"
    row = table_row(name)
    if row is not None:
        label, bw, peak, source = *row, "table"
    if hbm_tb_s:
        bw, source = hbm_tb_s * 1e12, "flags"
    if peak_tflops:
        peak, source = peak_tflops * 1e12, "flags"
    if bw is None or peak is None:
        if device.type == "cuda":
            raise SystemExit(f"gpu-check: {name!r} is not in the device table; give --hbm-tb-s and --peak-tflops")
        bw, peak = bw or 50e9, peak or 1e12          # a CPU dry run: nominal, so the arithmetic still runs
    return Ceilings(name, label, bw, peak, source)


def measured_ceilings(device: torch.device, quick: bool) -> dict:
    """What this device reaches on a plain copy and a large bf16 matmul: the practical ceilings beside the
    datasheet's."""
    n_bytes = (64 << 20) if quick else (4 << 30)
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), device, iters=5 if quick else 20)
    n = 512 if quick else 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm_s = _time(lambda: a @ b, device, iters=3 if quick else 10)
    del src, dst, a, b
    return {"copy_bytes_per_s": 2 * n_bytes / copy_s, "bf16_matmul_flops_per_s": 2 * n ** 3 / mm_s,
            "copy_bytes": n_bytes, "matmul_n": n}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, iters: int, warmup: int = 2, max_s: float = 3.0) -> float:
    """Seconds per call: the mean over `iters` calls after `warmup` (fewer if they pass max_s)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start, done = time.perf_counter(), 0
    while done < iters:
        fn()
        done += 1
        if time.perf_counter() - start > max_s:
            break
    _sync(device)
    return (time.perf_counter() - start) / done


# ---- models with random weights -----------------------------------------------------------------------------
def shapes(quick: bool) -> list[tuple[str, "ModelConfig"]]:  # noqa: F821 - imported lazily (import_engine_modules)
    """(name, config) of the models timed, most important first (a --budget-s cut loses the last)."""
    from workers.config import ModelConfig
    from workers.parallel.plan import shape_config

    if quick:
        tiny = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                    torch_dtype="bfloat16")
        return [("tiny-gqa", ModelConfig.from_dict(tiny)),
                ("tiny-mha", ModelConfig.from_dict(dict(tiny, num_key_value_heads=4)))]
    out = [("llama3.1-8b", shape_config("llama3-8b")[1]), ("llama3.2-1b", shape_config("llama3-1b")[1])]
    wide = shape_config("llama3-70b")[1]
    out.append(("llama3.1-70b-4-layers", dataclasses.replace(wide, num_hidden_layers=4)))
    return out


@contextlib.contextmanager
def path_switches(path: str):
    """The switches of one of PATHS set while a runner picks its backends (when it is built) and captures its
    decode graphs (when its KV cache is allocated), then restored."""
    saved = {k: os.environ.get(k) for k in PATHS[path]}
    try:
        os.environ.update(PATHS[path])
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def random_runner(cfg, *, dtype: torch.dtype, device: torch.device, max_model_len: int, block_size: int,
                  path: str, seed: int = 0):
    """A ModelRunner with random weights (std 0.02 matrices, norms near 1), on the Triton path or the portable
    one. The weights are drawn in fp32 from `seed` on `device` and then cast, so two runners of the same seed
    and device hold the same model in their own dtypes."""
    from workers.model_runner import ModelRunner

    with path_switches(path):
        runner = ModelRunner(cfg, dtype=dtype, device=device, max_model_len=max_model_len, block_size=block_size,
                             kv_cache_dtype="fp8" if path in FP8_PATHS else "auto")
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in runner.model.parameters():
            mean, std = (1.0, 0.1) if p.dim() == 1 else (0.0, 0.02)     # norms near 1, matrices small
            p.copy_(torch.empty(p.shape, dtype=torch.float32, device=device).normal_(mean, std, generator=g))
    runner.model.pack_weights_for_cpu()
    return runner


def allocate_cache(runner, num_blocks: int, path: str) -> None:
    with path_switches(path):
        runner.allocate_kv_cache(num_blocks)


def backend_names(runner) -> dict:
    layer = runner.model.layers[0]
    return {"attention": type(layer.attention).__name__, "layer_ops": type(layer.ops).__name__,
            "cuda_graphs": runner.decode_graphs is not None}


# ---- steps and their bounds ---------------------------------------------------------------------------------
def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def decode_step(batch: int, context: int, block_size: int, vocab: int, seed: int = 0):
    """A decode step of `batch` sequences, each with `context` keys (its new token's included) in its own
    blocks: sequence i holds blocks [i * n, (i + 1) * n)."""
    return ragged_decode_step([context] * batch, block_size, vocab, blocks_for(context, block_size), seed)


def ragged_decode_step(lengths: list[int], block_size: int, vocab: int, stride: int, seed: int = 0):
    """A decode step of sequences with these context lengths; sequence i's blocks start at block i * stride."""
    from workers.model_runner import StepInput

    g = torch.Generator().manual_seed(seed)
    step = StepInput(input_ids=torch.randint(0, vocab, (len(lengths),), generator=g).tolist())
    for i, n in enumerate(lengths):
        table = list(range(i * stride, i * stride + blocks_for(n, block_size)))
        step.positions.append(n - 1)
        step.slot_mapping.append(table[(n - 1) // block_size] * block_size + (n - 1) % block_size)
        step.decode_block_tables.append(table)
        step.decode_seq_lens.append(n)
    step.num_decode = len(lengths)
    step.sample_indices = list(range(len(lengths)))
    return step


def prefill_step(tokens: int, block_size: int, vocab: int, seed: int = 0, all_logits: bool = False):
    """One prompt of `tokens` tokens computed in one chunk (blocks 0..n-1); the last row samples (or every
    row, `all_logits`, for the agreement checks)."""
    from workers.model_runner import StepInput

    g = torch.Generator().manual_seed(seed)
    table = list(range(blocks_for(tokens, block_size)))
    return StepInput(input_ids=torch.randint(0, vocab, (tokens,), generator=g).tolist(),
                     positions=list(range(tokens)),
                     slot_mapping=[table[p // block_size] * block_size + p % block_size for p in range(tokens)],
                     prefills=[(0, tokens, tokens, table)],
                     sample_indices=list(range(tokens)) if all_logits else [tokens - 1])


def layer_params(cfg) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    return (h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
            + 3 * h * cfg.intermediate_size + 2 * h)


def kv_bytes_per_token(cfg, elem_bytes: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem_bytes


def decode_bytes(cfg, batch: int, context: int, elem_bytes: int, kv_elem_bytes: int | None = None) -> int:
    """HBM bytes a decode step must read at least: every layer's weights, the final norm and the lm_head once,
    the batch's embedding rows, and each sequence's keys and values (kv_elem_bytes each: 1 for fp8)."""
    weights = cfg.num_hidden_layers * layer_params(cfg) + cfg.hidden_size * (cfg.vocab_size + 1 + batch)
    kv_elem = elem_bytes if kv_elem_bytes is None else kv_elem_bytes
    return weights * elem_bytes + batch * context * kv_bytes_per_token(cfg, kv_elem)


def prefill_flops(cfg, tokens: int) -> int:
    """FLOPs of one prompt's prefill: the layers' matmuls for every token, causal attention (QK^T and PV over
    the visible keys only) and the lm_head for the last token."""
    matmuls = 2 * tokens * cfg.num_hidden_layers * layer_params(cfg)
    attention = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * tokens * (tokens + 1) // 2
    return matmuls + attention + 2 * cfg.hidden_size * cfg.vocab_size


# ---- 1. correctness --------------------------------------------------------------------------------------------
def build_engine(path: str, device: torch.device, portable: bool = False):
    """An Engine over a checkpoint on `device` in fp32 (Engine.from_pretrained picks the default device)."""
    from workers.config import ModelConfig
    from workers.engine import Engine, EngineConfig, _find_tokenizer
    from workers.executor import LocalExecutor

    cfg = ModelConfig.from_pretrained(path)
    config = EngineConfig(show_progress=False, num_gpu_blocks_override=256, max_num_batched_tokens=64)
    with path_switches("portable" if portable else "triton"):
        executor = LocalExecutor(path, cfg, dtype=torch.float32, max_model_len=1024, block_size=config.block_size,
                                 budget=config.cache_budget(), device=device, show_progress=False)
    return Engine(cfg, executor, _find_tokenizer(path), config, 1024), backend_names(executor.runner)


def hf_greedy(model, prompt: list[int], n: int, device: torch.device) -> list[int]:
    ids = torch.tensor([prompt], device=device)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def check_greedy(device: torch.device, workdir: Path, quick: bool) -> dict:
    """Greedy tokens of the tiny test checkpoints (fp32, chunked prefill so steps mix decodes and extends)
    against transformers on the same device, or against the portable path when transformers is absent."""
    from tests.checkpoints import LLAMA2_MHA, LLAMA3_GQA_TIED, LLAMA3_ROPE_PARAMETERS, make_checkpoint
    from workers.sampling import SamplingParams

    try:
        import transformers
    except ImportError:
        transformers = None
    torch.backends.cuda.matmul.allow_tf32 = False       # fp32 means fp32 on both sides
    n_new = 4 if quick else 24
    g = torch.Generator().manual_seed(1)
    greedy = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    results = []
    for name, spec in (("llama2-mha", LLAMA2_MHA), ("llama3-gqa-tied", LLAMA3_GQA_TIED),
                       ("llama3-rope-parameters", LLAMA3_ROPE_PARAMETERS)):
        path = make_checkpoint(workdir, name, spec)
        prompts = [torch.randint(4, spec["vocab_size"], (n,), generator=g).tolist()
                   for n in ((5, 37) if quick else (5, 37, 16, 1, 64, 23, 150))]
        engine, backends = build_engine(str(path), device)
        try:
            got = [o.token_ids for o in engine.generate(prompts, greedy)]
        finally:
            engine.shutdown()
        if transformers is not None:
            reference = "transformers"
            hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
            expected = [hf_greedy(hf, p, n_new, device) for p in prompts]
            del hf
        else:
            reference = "portable path (transformers is not installed here)"
            engine, _ = build_engine(str(path), device, portable=True)
            try:
                expected = [o.token_ids for o in engine.generate(prompts, greedy)]
            finally:
                engine.shutdown()
        results.append({"checkpoint": name, "reference": reference, "backends": backends,
                        "prompts": len(prompts), "tokens_each": n_new,
                        "equal": got == expected,
                        "mismatched_prompts": [i for i, (a, b) in enumerate(zip(got, expected)) if a != b]})
    return {"all_equal": all(r["equal"] for r in results), "checkpoints": results}


def check_bf16_agreement(device: torch.device, quick: bool) -> dict:
    """bf16 (the Triton path) against fp32 (the portable path) on the same random Llama-3.2-1B-shaped weights:
    teacher-forced logits of a prompt's every position, then of decode steps, compared by top-1 token and by
    the log-probability the bf16 model gives the fp32 model's top token."""
    cfg = shapes(quick)[0][1] if quick else _shape("llama3-1b")
    prompt_len, decode_steps, bs = (48, 4, 16) if quick else (512, 16, 16)
    max_len = prompt_len + decode_steps + 1
    ref = random_runner(cfg, dtype=torch.float32, device=device, max_model_len=max_len, block_size=bs,
                        path="portable")
    test = random_runner(cfg, dtype=torch.bfloat16, device=device, max_model_len=max_len, block_size=bs,
                         path="triton")
    blocks = blocks_for(max_len, bs)
    allocate_cache(ref, blocks, "portable")
    allocate_cache(test, blocks, "triton")
    tested = {"bf16": test}
    if device.type == "cuda":        # the same bf16 model over an fp8 KV cache
        tested["bf16_fp8_kv"] = random_runner(cfg, dtype=torch.bfloat16, device=device, max_model_len=max_len,
                                              block_size=bs, path="triton-fp8")
        allocate_cache(tested["bf16_fp8_kv"], blocks, "triton-fp8")
    step = prefill_step(prompt_len, bs, cfg.vocab_size, seed=3, all_logits=True)
    ref_logits = [ref.execute(step)]
    test_logits = {k: [r.execute(step)] for k, r in tested.items()}
    # Decode steps, fed the fp32 model's greedy tokens (both models see the same history).
    token = int(ref_logits[0][-1].argmax())
    table = list(range(blocks))
    for i in range(decode_steps):
        pos = prompt_len + i
        from workers.model_runner import StepInput
        d = StepInput(input_ids=[token], positions=[pos], slot_mapping=[table[pos // bs] * bs + pos % bs],
                      num_decode=1, decode_block_tables=[table], decode_seq_lens=[pos + 1], sample_indices=[0])
        ref_logits.append(ref.execute(d))
        for k, r in tested.items():
            test_logits[k].append(r.execute(d))
        token = int(ref_logits[-1][0].argmax())
    out = {"shape": "llama3.2-1b" if not quick else "tiny", "prompt_tokens": prompt_len, "decode_steps": decode_steps,
           "reference": f"fp32, {backend_names(ref)}", "tested": f"bf16, {backend_names(test)}"}
    for k, logits in test_logits.items():
        for part, r, t in (("prefill", ref_logits[0], logits[0]),
                           ("decode", torch.cat(ref_logits[1:]), torch.cat(logits[1:]))):
            top = r.argmax(-1)
            ref_lp = torch.log_softmax(r.double(), -1).gather(1, top[:, None])[:, 0]
            test_lp = torch.log_softmax(t.double(), -1).gather(1, top[:, None])[:, 0]
            err = (ref_lp - test_lp).abs()
            name = part if k == "bf16" else f"{part}_{k}"       # prefill, decode, prefill_bf16_fp8_kv, ...
            out[name] = {"top1_agreement": float((t.argmax(-1) == top).double().mean()),
                         "logprob_abs_err_mean": float(err.mean()), "logprob_abs_err_max": float(err.max())}
    del ref, test, tested
    _free(device)
    return out


def check_graphs_match_eager(device: torch.device, quick: bool) -> dict:
    """Decode steps replayed from the CUDA graphs (batches padded into buckets, block tables padded to
    max_model_len) against the same steps run eagerly, on a random bf16 model over a random cache: the largest
    logit difference and the argmax agreement per batch size."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need CUDA"}
    cfg = shapes(quick)[0][1] if quick else _shape("llama3-1b")
    bs, max_len = 16, 2048
    runner = random_runner(cfg, dtype=torch.bfloat16, device=device, max_model_len=max_len, block_size=bs,
                           path="triton")
    batches = (1, 3, 5, 17, 40)
    allocate_cache(runner, max(batches) * blocks_for(max_len, bs), "triton")
    if runner.decode_graphs is None:
        return {"skipped": "no graphs were captured (the Triton attention is off or missing)"}
    g = torch.Generator(device=device).manual_seed(7)
    for k, v in runner.kv_caches:
        k.normal_(generator=g)
        v.normal_(generator=g)
    lengths = torch.randint(1, max_len, (max(batches),), generator=torch.Generator().manual_seed(8)).tolist()
    out = {}
    for batch in batches:
        step = ragged_decode_step(lengths[:batch], bs, cfg.vocab_size, blocks_for(max_len, bs), seed=batch)
        replayed = runner.execute(step).float()
        graphs, runner.decode_graphs = runner.decode_graphs, None
        try:
            eager = runner.execute(step).to(device).float()      # the same k/v rewritten to the same slots
        finally:
            runner.decode_graphs = graphs
        out[f"batch{batch}"] = {"max_abs_diff": float((replayed - eager).abs().max()),
                                "argmax_agreement": float((replayed.argmax(-1) == eager.argmax(-1)).float().mean())}
    del runner
    _free(device)
    return out


def check_tp2_graphs(device: torch.device, quick: bool) -> dict:
    """TP 2 over two GPUs (two processes, NCCL, set up as a shard group's workers are): greedy tokens of a
    batch of prompts with the shards' decode graphs (their all-reduces and the logits' all-gather captured
    through the capture-safe group) against the same shards decoding eagerly. Skipped, and said so, on a
    machine with fewer than two GPUs."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if gpus < 2:
        return {"skipped": f"TP 2 with CUDA graphs needs 2 GPUs; this machine has {gpus}"}
    from tests.checkpoints import LLAMA3_GQA_TIED, make_checkpoint

    n_new = 6 if quick else 24
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), "tp2", dict(LLAMA3_GQA_TIED, dtype="float32"))
        results = ctx.Queue()
        procs = [ctx.Process(target=_tp2_rank, args=(r, f"file://{tmp}/rendezvous", str(path), n_new, results),
                             daemon=True) for r in (0, 1)]
        for proc in procs:
            proc.start()
        try:
            outs = sorted((results.get(timeout=300) for _ in procs), key=lambda o: o["rank"])
        except queue.Empty:
            return {"error": "a TP rank neither finished nor failed within 300 s (a hang in a collective?)"}
        finally:
            for proc in procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        return {"error": errors[0][-4000:]}
    r0, r1 = outs
    return {"graphs_captured": r0["buckets"], "replays": r0["replays"], "tokens_each": n_new,
            "prompts": len(r0["with_graphs"]), "ranks_agree": r0["with_graphs"] == r1["with_graphs"],
            "equal": r0["with_graphs"] == r0["eager"] and bool(r0["buckets"]) and r0["replays"] > 0,
            "mismatched_prompts": [i for i, (a, b) in enumerate(zip(r0["with_graphs"], r0["eager"])) if a != b]}


def _tp2_rank(rank: int, init_method: str, path: str, n_new: int, results) -> None:
    """One rank of check_tp2_graphs, on GPU `rank`: its greedy tokens with and without its decode graphs."""
    try:
        import torch.distributed as dist

        from workers import cuda_graphs
        from workers.config import ModelConfig
        from workers.model_runner import ModelRunner
        from workers.parallel.distributed import init_shard_group
        from workers.shard import ShardInfo

        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.backends.cuda.matmul.allow_tf32 = False       # fp32 means fp32: graphs and eager alike
        comm = init_shard_group(init_method=init_method, tp_rank=rank, pp_rank=0, tp_size=2, pp_size=1,
                                device=device, timeout_s=120)
        bs = 16
        with path_switches("triton"):
            runner = ModelRunner(ModelConfig.from_pretrained(path), shard=ShardInfo(tp_rank=rank, tp_size=2),
                                 group=comm.tp_group, dtype=torch.float32, device=device, max_model_len=1024,
                                 block_size=bs)
            runner.load_weights(path, show_progress=False)
            # As ShardWorker.init: the group agrees on its graphs (and gets its capture-safe TP group) first.
            runner.agreed_graph_batch = comm.agree_on_graphs(cuda_graphs.requested_max_batch(runner))
            runner.allocate_kv_cache(256)
        graphs, replays = runner.decode_graphs, []
        if graphs is not None:
            replay = graphs.replay
            graphs.replay = lambda bucket: replays.append(bucket) or replay(bucket)
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(4, runner.cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 37, 16, 1, 64)]
        with_graphs = greedy_tokens(runner, prompts, n_new, bs)
        runner.decode_graphs = None
        eager = greedy_tokens(runner, prompts, n_new, bs)
        results.put({"rank": rank, "with_graphs": with_graphs, "eager": eager, "replays": len(replays),
                     "buckets": list(graphs.buckets) if graphs is not None else []})
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put({"rank": rank, "error": traceback.format_exc()})


def greedy_tokens(runner, prompts: list[list[int]], n_new: int, block_size: int) -> list[list[int]]:
    """Greedy tokens of the prompts decoded together on one runner: one prefill step, then pure decode steps
    (what the graphs replay). On a TP shard every rank gets the full logits, so every rank picks the same
    tokens and the ranks stay in step without talking."""
    from workers.model_runner import StepInput

    bs = block_size
    stride = blocks_for(max(map(len, prompts)) + n_new, bs)
    tables = [list(range(i * stride, (i + 1) * stride)) for i in range(len(prompts))]
    step = StepInput()
    for prompt, table in zip(prompts, tables):
        start, n = len(step.input_ids), len(prompt)
        step.input_ids += prompt
        step.positions += list(range(n))
        step.slot_mapping += [table[q // bs] * bs + q % bs for q in range(n)]
        step.prefills.append((start, n, n, table[:blocks_for(n, bs)]))
        step.sample_indices.append(start + n - 1)
    tokens = [[t] for t in runner.execute(step).argmax(-1).tolist()]
    for _ in range(n_new - 1):
        lens = [len(p) + len(t) for p, t in zip(prompts, tokens)]            # keys, the new token's included
        step = StepInput(input_ids=[t[-1] for t in tokens], positions=[n - 1 for n in lens],
                         slot_mapping=[tb[(n - 1) // bs] * bs + (n - 1) % bs for tb, n in zip(tables, lens)],
                         num_decode=len(prompts), decode_block_tables=[tb[:blocks_for(n, bs)] for tb, n in
                                                                       zip(tables, lens)],
                         decode_seq_lens=lens, sample_indices=list(range(len(prompts))))
        for seq, t in zip(tokens, runner.execute(step).argmax(-1).tolist()):
            seq.append(t)
    return tokens


def check_memory_sizing(device: torch.device, quick: bool, utilization: float = 0.9) -> dict:
    """The KV pool sized by gpu_memory.profiled_kv_blocks for a random Llama-3.2-1B-shaped bf16 runner, then
    allocated, its decode graphs captured and its largest steps run: what the device reports afterwards, and
    whether the replica stayed inside its share."""
    if device.type != "cuda":
        return {"skipped": "sizing from the device's memory needs CUDA"}
    from workers.gpu_memory import PROFILE_DECODE_BATCH, PROFILE_TOKENS, kv_blocks, measure

    cfg = shapes(quick)[0][1] if quick else _shape("llama3-1b")
    bs = 16
    _free(device)
    runner = random_runner(cfg, dtype=torch.bfloat16, device=device, max_model_len=8192, block_size=bs,
                           path="triton")
    reading = measure(runner, graphs=runner.device.type == "cuda")     # what LocalExecutor does on CUDA
    blocks = kv_blocks(reading, utilization, runner.block_bytes())
    torch.cuda.reset_peak_memory_stats(device)
    allocate_cache(runner, blocks, "triton")
    runner.execute(prefill_step(PROFILE_TOKENS, bs, cfg.vocab_size))
    runner.execute(decode_step(PROFILE_DECODE_BATCH, 1, bs, cfg.vocab_size)).argmax(-1).tolist()
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    out = {"utilization": utilization, "total_bytes": total, "reading": dataclasses.asdict(reading),
           "kv_blocks": blocks, "kv_bytes": blocks * runner.block_bytes(),
           "graph_pool_bytes": runner.decode_graphs.memory_bytes if runner.decode_graphs else 0,
           "torch_peak_bytes": torch.cuda.max_memory_allocated(device), "device_used_bytes": total - free,
           "within_share": total - free <= int(total * utilization) + (reading.total - reading.free - reading.allocated)}
    del runner
    _free(device)
    return out


def _shape(name: str):
    from workers.parallel.plan import shape_config
    return shape_config(name)[1]


def _free(device: torch.device) -> None:
    """Give a dropped runner's memory back: its decode graphs refer to it (a cycle only gc breaks), and the
    next runner needs the device's memory for its own cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- 2. speed --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    batches: tuple[int, ...]
    contexts: tuple[int, ...]
    prefill_tokens: int
    block_size: int = 16


def time_shape(name: str, cfg, device: torch.device, plan: Plan, ceilings: Ceilings, deadline: float,
               quick: bool, paths: tuple[str, ...] = ("triton", "portable")) -> dict:
    """Decode and prefill timings of one shape on each of `paths` (keys of PATHS)."""
    elem = 2                                                         # bf16
    bs = plan.block_size
    max_len = max(max(plan.contexts), plan.prefill_tokens) + 1
    wanted_blocks = max(max(plan.batches) * blocks_for(max(plan.contexts), bs), blocks_for(plan.prefill_tokens, bs))
    rows, prefill, skipped = [], [], []
    for path in paths:
        if time.perf_counter() > deadline:
            skipped.append({"shape": name, "path": path, "why": "time budget spent"})
            continue
        if path in FP8_PATHS and device.type != "cuda":
            skipped.append({"shape": name, "path": path, "why": "the fp8 KV cache needs CUDA"})
            continue
        runner = random_runner(cfg, dtype=torch.bfloat16, device=device, max_model_len=max_len, block_size=bs,
                               path=path)
        block_bytes = runner.block_bytes()
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            fits = int((free - (6 << 30)) // block_bytes)   # headroom for the step's activations and logits
        else:
            fits = wanted_blocks
        num_blocks = max(1, min(wanted_blocks, fits))
        allocate_cache(runner, num_blocks, path)
        backends = backend_names(runner)
        for context in plan.contexts:
            for batch in plan.batches:
                entry = {"shape": name, "path": path, "batch": batch, "context": context}
                if batch * blocks_for(context, bs) > num_blocks:
                    skipped.append(dict(entry, why=f"KV of {batch}x{context} tokens does not fit beside the weights"))
                    continue
                if time.perf_counter() > deadline:
                    skipped.append(dict(entry, why="time budget spent"))
                    continue
                step = decode_step(batch, context, bs, cfg.vocab_size)
                # A step as the engine runs it greedily: the forward, the argmax, the ids on the host.
                seconds = _time(lambda: runner.execute(step).argmax(-1).tolist(), device, iters=5 if quick else 30,
                                max_s=0.5 if quick else 2.0)
                kv_elem = runner.kv_dtype.itemsize
                bound = decode_bytes(cfg, batch, context, elem, kv_elem) / ceilings.hbm_bytes_per_s
                rows.append(dict(entry, backends=backends, step_ms=seconds * 1e3, bound_ms=bound * 1e3,
                                 fraction_of_bound=bound / seconds, tokens_per_s=batch / seconds))
        if time.perf_counter() < deadline:
            step = prefill_step(plan.prefill_tokens, bs, cfg.vocab_size)
            seconds = _time(lambda: runner.execute(step), device, iters=3 if quick else 10,
                            max_s=0.5 if quick else 3.0)
            flops = prefill_flops(cfg, plan.prefill_tokens)
            prefill.append({"shape": name, "path": path, "backends": backends, "tokens": plan.prefill_tokens,
                            "seconds": seconds, "tokens_per_s": plan.prefill_tokens / seconds,
                            "bound_s": flops / ceilings.bf16_flops_per_s,
                            "fraction_of_peak": flops / ceilings.bf16_flops_per_s / seconds})
        else:
            skipped.append({"shape": name, "path": path, "prefill": plan.prefill_tokens, "why": "time budget spent"})
        del runner
        _free(device)
    _add_speedups(rows, prefill)
    return {"decode": rows, "prefill": prefill, "skipped": skipped}


def _add_speedups(rows: list[dict], prefill: list[dict]) -> None:
    """Each Triton-path row gets speedup_vs_portable where the portable path ran the same case (and the
    graph-replayed one speedup_vs_eager where the eager Triton path did)."""
    by_path = {(r["path"], r["shape"], r["batch"], r["context"]): r for r in rows}
    for r in rows:
        case = (r["shape"], r["batch"], r["context"])
        portable, eager = by_path.get(("portable", *case)), by_path.get(("triton-eager", *case))
        if r["path"] != "portable" and portable:
            r["speedup_vs_portable"] = portable["step_ms"] / r["step_ms"]
        if r["path"] == "triton" and eager:
            r["speedup_vs_eager"] = eager["step_ms"] / r["step_ms"]      # what the CUDA graphs save
    portable_prefill = {p["shape"]: p for p in prefill if p["path"] == "portable"}
    for p in prefill:
        other = portable_prefill.get(p["shape"])
        if p["path"] == "triton" and other:
            p["speedup_vs_portable"] = other["seconds"] / p["seconds"]


def judge_targets(decode: list[dict], prefill: list[dict], shape: str) -> dict:
    """Issue 11's targets for `shape` (the 8B): met, missed, or not measured (None)."""
    def row(batch):
        return [r for r in decode if r["shape"] == shape and r["path"] == "triton" and r["batch"] == batch]
    out = {}
    for batch in (1, 16):
        found = row(batch)
        out[f"decode_batch{batch}_half_of_hbm_bound"] = (
            all(r["fraction_of_bound"] >= TARGET_DECODE_BOUND_FRACTION for r in found) if found else None)
    at64 = [r for r in row(64) if "speedup_vs_portable" in r]
    out["decode_batch64_5x_portable"] = all(r["speedup_vs_portable"] >= TARGET_DECODE_SPEEDUP for r in at64) if at64 else None
    p = [x for x in prefill if x["shape"] == shape and x["path"] == "triton"]
    out["prefill_40pct_of_peak"] = p[0]["fraction_of_peak"] >= TARGET_PREFILL_PEAK_FRACTION if p else None
    return out


# ---- 3. report -------------------------------------------------------------------------------------------------
def write_png(report: dict, path: Path) -> str | None:
    """Decode: fraction of the HBM bound per case, Triton path and portable path side by side; prefill: fraction
    of bf16 peak. Returns why no PNG was written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed here"
    decode = report["decode"]
    if not decode:
        return "no decode step was timed"
    shape_names = list(dict.fromkeys(r["shape"] for r in decode))
    fig, axes = plt.subplots(1, len(shape_names) + 1, figsize=(5 * (len(shape_names) + 1), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shape_names):
        cases = list(dict.fromkeys((r["context"], r["batch"]) for r in decode if r["shape"] == shape))
        path_names = list(dict.fromkeys(r["path"] for r in decode if r["shape"] == shape))
        width = 0.8 / len(path_names)
        for k, path_name in enumerate(path_names):
            by_case = {(r["context"], r["batch"]): r for r in decode if r["shape"] == shape and r["path"] == path_name}
            xs = [i + width * k for i, c in enumerate(cases) if c in by_case]
            ys = [by_case[c]["fraction_of_bound"] for c in cases if c in by_case]
            ax.bar(xs, ys, width=width, label=path_name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))], [f"{b}\n{c}" for c, b in cases], fontsize=7)
        ax.axhline(TARGET_DECODE_BOUND_FRACTION, color="grey", lw=0.8, ls="--")
        ax.set_title(f"decode: {shape}", fontsize=9)
        ax.set_xlabel("batch / context tokens", fontsize=8)
        ax.set_ylabel("fraction of HBM bound", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    labels = [f"{p['shape']}\n{p['path']}" for p in report["prefill"]]
    ax.bar(range(len(labels)), [p["fraction_of_peak"] for p in report["prefill"]])
    ax.set_xticks(range(len(labels)), labels, fontsize=6)
    ax.axhline(TARGET_PREFILL_PEAK_FRACTION, color="grey", lw=0.8, ls="--")
    ax.set_title(f"prefill {report['plan']['prefill_tokens']} tokens", fontsize=9)
    ax.set_ylabel("fraction of bf16 peak", fontsize=8)
    fig.suptitle(f"herd gpu-check on {report['device']['name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-out/gpu-check", help="folder for gpu_check.json and gpu_check.png")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the script itself)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few iterations")
    ap.add_argument("--hbm-tb-s", type=positive_float, default=None,
                    help="HBM bandwidth in TB/s (default: the device table)")
    ap.add_argument("--peak-tflops", type=positive_float, default=None,
                    help="dense bf16 TFLOP/s (default: the device table)")
    ap.add_argument("--budget-s", type=non_negative_float, default=420.0,
                    help="stop starting timings after this many seconds")
    ap.add_argument("--print-wheels", action="store_true",
                    help="print the name==version lines `make gpu-wheels` downloads, and exit")
    args = ap.parse_args(argv)
    if args.print_wheels:
        print("\n".join(wheel_requirements()))
        return 0
    started = time.perf_counter()
    installed = import_engine_modules()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device here (use --device cpu --quick for a dry run)")
    import triton
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ceilings = device_ceilings(device, args.hbm_tb_s, args.peak_tflops)
    plan = Plan((1, 4), (32, 80), 64) if args.quick else Plan((1, 16, 64, 256), (512, 4096), 2048)
    report: dict = {
        "device": {"name": ceilings.device_name, "table_row": ceilings.label,
                   "hbm_bytes_per_s": ceilings.hbm_bytes_per_s, "bf16_flops_per_s": ceilings.bf16_flops_per_s,
                   "ceilings_from": ceilings.source},
        "software": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "wheels_installed": installed},
        "quick": args.quick, "plan": dataclasses.asdict(plan),
    }
    print(f"gpu-check on {ceilings.device_name} (bound from {ceilings.source}: "
          f"{ceilings.hbm_bytes_per_s / 1e12:.2f} TB/s, {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s bf16)", flush=True)
    json_path = out / "gpu_check.json"

    def section(key: str, fn) -> None:
        """One part of the check; its failure is recorded and the others still run, and the JSON is written
        after each part (a device session is short: a late failure or a timeout keeps what came before)."""
        try:
            report[key] = fn()
        except Exception as e:  # noqa: BLE001 - one failing part must not cost the others
            report[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            _free(device)
        print(f"{key}: {json.dumps(report[key])[:2000]}", flush=True)
        json_path.write_text(json.dumps(report, indent=2))

    section("measured_ceilings", lambda: measured_ceilings(device, args.quick))
    with tempfile.TemporaryDirectory() as tmp:
        section("greedy_vs_reference", lambda: check_greedy(device, Path(tmp), args.quick))
    section("bf16_agreement", lambda: check_bf16_agreement(device, args.quick))
    section("graphs_vs_eager", lambda: check_graphs_match_eager(device, args.quick))
    section("tp2_graphs_vs_eager", lambda: check_tp2_graphs(device, args.quick))
    section("memory_sizing", lambda: check_memory_sizing(device, args.quick))
    deadline = started + args.budget_s
    report["decode"], report["prefill"], report["skipped"] = [], [], []
    for name, cfg in shapes(args.quick):
        # The first shape (the 8B) also runs the Triton path without CUDA graphs (what the graphs save) and
        # with an fp8 KV cache (half the KV bytes; its bound counts one byte an element).
        first = name == shapes(args.quick)[0][0]
        paths = ("triton", "triton-eager", "triton-fp8", "portable") if first else ("triton", "portable")
        section(f"timing_{name}", lambda: time_shape(name, cfg, device, plan, ceilings, deadline, args.quick, paths))
        timed = report.pop(f"timing_{name}")
        if "error" in timed:
            report.setdefault("errors", {})[f"timing {name}"] = timed
            continue
        for key in ("decode", "prefill", "skipped"):
            report[key] += timed[key]
        for r in timed["decode"]:
            print(f"  decode {r['shape']:>22} {r['path']:>12} batch {r['batch']:>3} ctx {r['context']:>5}: "
                  f"{r['step_ms']:8.2f} ms (bound {r['bound_ms']:.2f} ms, {r['fraction_of_bound']:.0%})", flush=True)
        for p in timed["prefill"]:
            print(f"  prefill {p['shape']:>21} {p['path']:>12} {p['tokens']} tokens: {p['tokens_per_s']:,.0f} tok/s "
                  f"({p['fraction_of_peak']:.0%} of peak)", flush=True)
    target_shape = shapes(args.quick)[0][0]
    report["targets"] = {"shape": target_shape, **judge_targets(report["decode"], report["prefill"], target_shape)}
    report["elapsed_s"] = time.perf_counter() - started
    png_problem = write_png(report, out / "gpu_check.png")
    report["png"] = None if png_problem else "gpu_check.png"
    if png_problem:
        report["png_skipped"] = png_problem
        print(f"no PNG: {png_problem}")
    json_path.write_text(json.dumps(report, indent=2))
    print(f"targets: {json.dumps(report['targets'])}")
    print(f"wrote {json_path} in {report['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
