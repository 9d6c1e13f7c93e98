"""One shard of a TP × PP group: a Ray actor holding its slice of the weights and of the KV cache.

The driver sends every shard the same `StepInput` (plain lists) each step. Stage 0 embeds the token ids;
later stages receive the previous stage's hidden states over torch.distributed (`PipeLink`), run their
layers, and send theirs on; the last stage's TP rank 0 returns the logits. Everything else returns None,
so the only bytes that come back to the driver are the logits of the sampled rows.
"""
from __future__ import annotations

import collections
import os
import time

import numpy as np
import psutil
import ray
import torch

from ..config import ModelConfig
from ..cuda_graphs import requested_max_batch
from ..executor import CacheBudget, default_device
from ..model_runner import ModelRunner, StepInput
from ..shard import ShardInfo
from .distributed import PipeLink, ShardComm, free_port, global_rank, init_shard_group, remove_rendezvous_file


class ShardWorker:
    """Runs as a Ray actor (RayExecutor makes it one: `ray.remote(**ACTOR_OPTIONS)(worker_class)`)."""

    def __init__(self, cfg: ModelConfig, shard: ShardInfo, dtype: torch.dtype, max_model_len: int, block_size: int,
                 kv_cache_dtype: str = "auto"):
        torch.set_grad_enabled(False)
        self.cfg, self.shard, self.dtype = cfg, shard, dtype
        self.max_model_len, self.block_size, self.kv_cache_dtype = max_model_len, block_size, kv_cache_dtype
        self.device = default_device()
        if self.device.type == "cuda":  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s)
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        self.rank = global_rank(shard.tp_rank, shard.pp_rank, shard.tp_size)
        self.comm = ShardComm(None, PipeLink(None, None), "none")
        self.runner: ModelRunner | None = None
        self.timeline: collections.deque = collections.deque(maxlen=256)  # (start, end, tokens) of recent calls
        self.init_method = ""  # where the group met (distributed.rendezvous), once init() ran

    # ---- setup ---------------------------------------------------------------------------------
    def node_address(self) -> tuple[str, str, int]:
        """(this shard's node id, its IP, a free port there): what the group's rendezvous is chosen from."""
        ip = ray.util.get_node_ip_address()
        return ray.get_runtime_context().get_node_id(), ip, free_port(ip)

    def init(self, init_method: str, timeout_s: float) -> tuple[str, str]:
        """Join the group's process group (at `init_method`, see distributed.rendezvous) and build the runner;
        returns (device type, backend)."""
        self.init_method = init_method
        if self.shard.tp_size * self.shard.pp_size > 1:
            self.comm = init_shard_group(init_method=init_method,
                                         tp_rank=self.shard.tp_rank, pp_rank=self.shard.pp_rank,
                                         tp_size=self.shard.tp_size, pp_size=self.shard.pp_size,
                                         device=self.device, timeout_s=timeout_s)
        self.runner = ModelRunner(self.cfg, shard=self.shard, group=self.comm.tp_group, dtype=self.dtype,
                                  device=self.device, max_model_len=self.max_model_len, block_size=self.block_size,
                                  kv_cache_dtype=self.kv_cache_dtype)
        if self.shard.tp_size * self.shard.pp_size > 1:
            # Decode graphs: the group's ranks agree on their buckets now, before the KV cache is sized (with TP
            # this also sets up the capture-safe collectives: distributed.py); capture follows the cache.
            self.runner.agreed_graph_batch = self.comm.agree_on_graphs(requested_max_batch(self.runner))
        return self.device.type, self.comm.backend

    def load_weights(self, path: str) -> int:
        self.runner.load_weights(path, show_progress=False)
        return self.runner.weight_bytes_read

    def num_blocks(self, budget: CacheBudget) -> int:
        return budget.num_blocks(self.device, self.runner.block_bytes())

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    # ---- the step --------------------------------------------------------------------------------
    def execute(self, step: StepInput) -> np.ndarray | None:
        """Run this shard's part of one (micro-)batch. Last stage, TP rank 0: fp32 logits as a numpy array
        (Ray moves numpy arrays without pickling their data; what that saves per step: docs/parallel.md),
        copied to the host where a replayed decode graph left them on the GPU."""
        hidden = None
        if not self.shard.is_first_stage:
            hidden = self.comm.pipe.recv(step.num_tokens, self.cfg.hidden_size, self.dtype, self.device)
        start = time.time()
        out = self.runner.execute(step, hidden)
        self.timeline.append((start, time.time(), step.num_tokens))
        if not self.shard.is_last_stage:
            self.comm.pipe.send(out)
            return None
        return out.cpu().numpy() if self.shard.tp_rank == 0 else None

    # ---- operations ------------------------------------------------------------------------------
    def ping(self) -> int:
        return self.rank

    def stats(self) -> dict:
        kv = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.runner.kv_caches)
        return {"rank": self.rank, "tp_rank": self.shard.tp_rank, "pp_rank": self.shard.pp_rank,
                "layers": [self.shard.layer_start, self.shard.layer_end],
                "weight_bytes": self.runner.model.weight_bytes(), "weight_bytes_read": self.runner.weight_bytes_read,
                "kv_cache_bytes": kv, "rss_bytes": psutil.Process(os.getpid()).memory_info().rss,
                "device": str(self.device), "backend": self.comm.backend, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}

    def forget_rendezvous(self) -> None:
        """Remove the group's rendezvous file, if it met through one (the executor asks rank 0 at shutdown)."""
        remove_rendezvous_file(self.init_method)

    def recent_timeline(self) -> list[tuple[float, float, int]]:
        """Wall-clock (start, end, tokens) of this shard's recent compute (benchmarks, pipeline tests)."""
        return list(self.timeline)
