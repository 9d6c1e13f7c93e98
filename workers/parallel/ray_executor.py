"""RayExecutor: the model's forward pass on a TP × PP group of Ray shard workers.

The engine core (scheduler, KV bookkeeping, sampling) stays in the driver; each step is sent to every
worker. Pipeline stages hand activations on through Ray's object store: the driver passes stage k's result
*reference* to stage k+1, never the data. The step is split into micro-batches (one per stage by default)
and all of them are submitted at once; since each actor runs its calls in order, stage 0 works on
micro-batch i+1 while stage 1 works on micro-batch i. Every wait has a timeout; a dead or hung shard
turns into EngineUnavailableError, and the executor reports unhealthy from then on.
"""
from __future__ import annotations

import logging
import os
import time

import ray
import torch

from ..config import ModelConfig
from ..errors import EngineUnavailableError
from ..model_runner import StepInput
from ..shard import ShardInfo, check_tensor_parallel, partition_layers
from .placement import place_shards
from .shard_worker import ShardWorker

log = logging.getLogger(__name__)


def ensure_ray() -> None:
    """Join the Ray cluster this process belongs to (RAY_ADDRESS, or the one already initialised), or start
    a local one."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:  # a private local cluster, reachable on loopback only
        log.info("starting a local Ray cluster on 127.0.0.1")
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)


def _fail_fast_wait(refs: list, timeout: float | None) -> None:
    """Wait for all refs, but raise as soon as any of them fails (ray.get on a list waits for all first)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not ready:
            raise ray.exceptions.GetTimeoutError(f"{len(pending)} results still pending")
        ray.get(ready)  # raises the shard's error, if any


class RayExecutor:
    def __init__(self, path: str, cfg: ModelConfig, *, tensor_parallel_size: int, pipeline_parallel_size: int,
                 dtype: torch.dtype, max_model_len: int, engine_config) -> None:
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        check_tensor_parallel(cfg, tp)
        layer_ranges = partition_layers(cfg.num_hidden_layers, pp, engine_config.pp_layer_partition)
        self.tp, self.pp = tp, pp
        self.timeout_s = engine_config.collective_timeout_s
        self.num_microbatches = engine_config.num_microbatches or pp
        self._dead: str | None = None
        ensure_ray()
        self.placement = place_shards(tp * pp, engine_config.resources_per_shard, engine_config.placement_strategy)
        self.stages: list[list] = []
        try:
            for p, (start, end) in enumerate(layer_ranges):
                stage = []
                for t in range(tp):
                    shard = ShardInfo(tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, layer_start=start, layer_end=end)
                    stage.append(ShardWorker.options(
                        scheduling_strategy=self.placement.scheduling(p * tp + t), **self.placement.actor_options(),
                    ).remote(cfg, shard, dtype, max_model_len, engine_config.block_size))
                self.stages.append(stage)
            self.workers = [w for stage in self.stages for w in stage]
            addr, port = self._get(self.workers[0].rendezvous_address.remote(), "rendezvous")
            self._get([w.init.remote(addr, port, self.timeout_s) for w in self.workers], "process group init")
            log.info("loading %s on %d shards (TP%d × PP%d)", path, tp * pp, tp, pp)
            self._get([w.load_weights.remote(path) for w in self.workers], "weight loading", timeout=None)
            budget = engine_config.cache_budget()
            self.num_blocks = min(self._get([w.num_blocks.remote(budget) for w in self.workers], "KV sizing"))
            self._get([w.allocate_kv_cache.remote(self.num_blocks) for w in self.workers], "KV allocation")
        except BaseException:
            self.shutdown()
            raise
        log.info("shard group ready: %d KV blocks per shard", self.num_blocks)

    def _get(self, refs, what: str, timeout: float | None = -1.0):
        timeout = self.timeout_s if timeout == -1.0 else timeout
        try:
            if isinstance(refs, list):
                _fail_fast_wait(refs, timeout)
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            self._dead = f"{what} timed out after {timeout}s"
        except ray.exceptions.RayActorError as e:
            self._dead = f"a shard worker died during {what}: {e.__class__.__name__}"
        except ray.exceptions.RayTaskError as e:
            self._dead = f"a shard worker failed during {what}: {e.cause!r}"
        raise EngineUnavailableError(self._dead)

    # ---- Executor interface ----------------------------------------------------------------------------
    def execute(self, step: StepInput) -> torch.Tensor:
        if self._dead:
            raise EngineUnavailableError(f"shard group is down: {self._dead}")
        micro = step.split(self.num_microbatches) if self.pp > 1 else [step]
        finals, everything = [], []
        for mb in micro:
            carried = None
            for stage in self.stages:
                refs = [w.execute.remote(mb, carried) for w in stage]
                everything += refs
                carried = refs[0]  # TP rank 0 carries the stage's output; the others return None
            finals.append(carried)
        # Wait on every shard's call, not only the carriers: a killed shard then fails the step at once
        # instead of leaving its peers blocked in a collective until the timeout.
        results = self._get(everything, "a step")
        by_ref = dict(zip(everything, results))
        logits = [by_ref[r] for r in finals if by_ref[r].numel()]
        return torch.cat(logits) if logits else torch.empty(0)

    def check_health(self) -> None:
        if self._dead:
            raise EngineUnavailableError(f"shard group is down: {self._dead}")
        self._get([w.ping.remote() for w in self.workers], "health check")

    def shard_stats(self) -> list[dict]:
        return self._get([w.stats.remote() for w in self.workers], "stats")

    def shutdown(self) -> None:
        for w in getattr(self, "workers", None) or [w for s in getattr(self, "stages", []) for w in s]:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.stages, self.workers = [], []
        if getattr(self, "placement", None) is not None:
            self.placement.release()
            self.placement = None
