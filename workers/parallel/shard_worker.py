"""One shard of a TP × PP group: a Ray actor holding its slice of the weights and of the KV cache."""
from __future__ import annotations

import os

import psutil
import ray
import torch

from ..config import ModelConfig
from ..executor import CacheBudget, default_device
from ..model_runner import ModelRunner, StepInput
from ..shard import ShardInfo
from .distributed import free_port, init_shard_group


@ray.remote(max_restarts=0, max_task_retries=0)
class ShardWorker:
    def __init__(self, cfg: ModelConfig, shard: ShardInfo, dtype: torch.dtype, max_model_len: int, block_size: int):
        torch.set_grad_enabled(False)
        self.cfg, self.shard, self.dtype = cfg, shard, dtype
        self.max_model_len, self.block_size = max_model_len, block_size
        self.device = default_device()
        if self.device.type == "cuda":  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.cuda.set_device(0)
        self.runner: ModelRunner | None = None
        self.global_rank = shard.pp_rank * shard.tp_size + shard.tp_rank

    def rendezvous_address(self) -> tuple[str, int]:
        """Called on rank 0 only: its node's address and a free port there."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def init(self, master_addr: str, master_port: int, timeout_s: float) -> None:
        group = None
        if self.shard.tp_size > 1:
            group = init_shard_group(master_addr=master_addr, master_port=master_port, rank=self.global_rank,
                                     tp_size=self.shard.tp_size, pp_size=self.shard.pp_size,
                                     device=self.device, timeout_s=timeout_s)
        self.runner = ModelRunner(self.cfg, shard=self.shard, group=group, dtype=self.dtype, device=self.device,
                                  max_model_len=self.max_model_len, block_size=self.block_size)

    def load_weights(self, path: str) -> int:
        self.runner.load_weights(path, show_progress=False)
        return self.runner.weight_bytes_read

    def num_blocks(self, budget: CacheBudget) -> int:
        return budget.num_blocks(self.device, self.runner.block_bytes())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def execute(self, step: StepInput, hidden: torch.Tensor | None = None):
        """Last stage: logits (from TP rank 0; other ranks return None). Earlier stages: hidden states."""
        out = self.runner.execute(step, hidden)
        if self.shard.tp_rank != 0:
            return None
        return out.cpu() if not self.shard.is_last_stage else out

    def ping(self) -> int:
        return self.global_rank

    def stats(self) -> dict:
        return {"rank": self.global_rank, "tp_rank": self.shard.tp_rank, "pp_rank": self.shard.pp_rank,
                "layers": [self.shard.layer_start, self.shard.layer_end],
                "weight_bytes": self.runner.model.weight_bytes(), "weight_bytes_read": self.runner.weight_bytes_read,
                "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
                "node_id": ray.get_runtime_context().get_node_id()}
