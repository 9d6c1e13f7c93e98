"""Executors run a step's model forward pass: in this process, or over a TP×PP group of Ray shard workers.

The engine core (scheduler, KV block bookkeeping, sampling) does not care which; it sees this interface:
`num_blocks` (KV blocks every shard has room for), `execute(step) -> logits`, `check_health()`,
`shutdown()`, `shard_stats()`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from .config import ModelConfig
from .errors import CheckpointError
from .model_runner import ModelRunner, StepInput

log = logging.getLogger(f"herd.{__name__}")

DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30   # 1 GiB
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


@dataclass(frozen=True)
class CacheBudget:
    """How much memory the KV cache may take on each shard."""
    kv_cache_memory: int | None = None          # bytes; the CPU default is 1 GiB
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    num_gpu_blocks_override: int | None = None  # exact block count (tests, benchmarks)

    def num_blocks(self, device: torch.device, block_bytes: int) -> int:
        if self.num_gpu_blocks_override:
            return self.num_gpu_blocks_override
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            # What the fraction of the GPU allows, minus what is in use already (weights, other processes),
            # minus headroom for activations of a step.
            budget = int(total * self.gpu_memory_utilization) - (total - free) - (512 << 20)
        else:
            budget = self.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
        if budget < block_bytes:
            raise CheckpointError(
                f"no memory left for the KV cache (budget {budget} bytes, one block needs {block_bytes}); "
                "raise kv_cache_memory / gpu_memory_utilization or use more shards")
        return budget // block_bytes


class Executor(Protocol):
    num_blocks: int

    def execute(self, step: StepInput) -> torch.Tensor: ...

    def check_health(self) -> None: ...

    def shutdown(self) -> None: ...

    def shard_stats(self) -> list[dict]: ...


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class LocalExecutor:
    """The whole model in this process (one GPU, or the CPU)."""

    def __init__(self, path: str, cfg: ModelConfig, *, dtype: torch.dtype, max_model_len: int, block_size: int,
                 budget: CacheBudget, device: torch.device | None = None, show_progress: bool = True,
                 kv_cache_dtype: str = "auto"):
        self.device = device or default_device()
        self.runner = ModelRunner(cfg, dtype=dtype, device=self.device, max_model_len=max_model_len,
                                  block_size=block_size, kv_cache_dtype=kv_cache_dtype)
        self.runner.load_weights(path, show_progress=show_progress)
        if self.device.type == "cuda" and not budget.num_gpu_blocks_override:
            from .gpu_memory import profiled_kv_blocks   # a profiling forward sizes the pool (gpu_memory.py)
            self.num_blocks = profiled_kv_blocks(self.runner, budget.gpu_memory_utilization, self.runner.block_bytes())
        else:
            self.num_blocks = budget.num_blocks(self.device, self.runner.block_bytes())
        self.runner.allocate_kv_cache(self.num_blocks)
        log.info("model loaded: %.1f MiB of weights, %d KV blocks of %d tokens",
                 self.runner.model.weight_bytes() / 2**20, self.num_blocks, block_size)

    def execute(self, step: StepInput) -> torch.Tensor:
        return self.runner.execute(step)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.runner.kv_caches = []
        self.runner.decode_graphs = None   # their memory pool (and their reference to the runner) goes too

    def shard_stats(self) -> list[dict]:
        return [{"rank": 0, "weight_bytes": self.runner.model.weight_bytes(),
                 "weight_bytes_read": self.runner.weight_bytes_read}]
