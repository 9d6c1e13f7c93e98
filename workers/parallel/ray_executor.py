"""RayExecutor: the model's forward pass on a TP × PP group of Ray shard workers.

The engine core (scheduler, KV block bookkeeping, sampling) stays in the driver. Each step the driver
hands every shard the same `StepInput`; shards exchange what they must among themselves over
torch.distributed (TP all-reduces inside a stage, hidden states from stage to stage), and only the last
stage's TP rank 0 returns anything: the logits of the rows to sample.

Two ways to deliver the step to the shards, same semantics:
- a Ray compiled graph (`ray.dag`, `experimental_compile`): the driver writes the step once into a
  shared-memory channel that every shard's resident execution loop reads — no per-call task submission
  (the hop it saves per step is measured in docs/parallel.md);
- plain actor calls (`execute.remote`).
`use_compiled_graph=None` (auto) compiles the graph when the shards run on GPUs and uses actor calls on the
CPU: a compiled graph's execution loop polls its channel and keeps one core busy per shard, which on CPU
shards is taken from the matmuls and cost more than the hop saved (docs/parallel.md has the figures). If a
graph cannot be compiled, auto falls back to actor calls; `use_compiled_graph=True` makes that an error.

Pipelining: with PP > 1 a step is split into micro-batches (`StepInput.split`) and all of them are
submitted before waiting on any. Each shard runs its calls in order, so stage k works on micro-batch i
while stage k+1 works on micro-batch i-1 (stage k+1 blocks in `recv` until stage k sends). Micro-batch
logits come back in `sample_indices` order, so concatenating them gives the step's logits.
How many micro-batches: `num_microbatches` when set (every step, decode included); by default (None) one
per stage for steps of at least MICROBATCH_MIN_TOKENS tokens per micro-batch, and the whole step otherwise.
A small step is memory-bound: each micro-batch re-reads all of a stage's weights, so splitting it costs more
than the overlap gains (whole vs split steps at several sizes: docs/parallel.md).

Failure: every wait has a deadline (`collective_timeout_s`, also the process groups' timeout), and every
result of every shard is awaited, not only the logits: a killed shard fails the step at once, a hung one at
the deadline. Either way `execute` raises `EngineUnavailableError`, the executor stays unhealthy
(`check_health` raises) and the caller builds a new engine.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import numpy as np
import ray
import torch

from ..config import ModelConfig
from ..errors import EngineUnavailableError, InvalidRequestError
from ..model_runner import StepInput
from ..shard import ShardInfo, check_tensor_parallel, partition_layers
from .placement import ShardPlacement, place_shards
from .distributed import remove_rendezvous_file, rendezvous
from .shard_worker import ShardWorker

log = logging.getLogger(f"herd.{__name__}")

MICROBATCH_MIN_TOKENS = 48    # auto: split a step only if each micro-batch keeps at least this many tokens
STARTUP_TIMEOUT_S = 300.0      # actor start + process-group rendezvous + KV allocation
LOAD_TIMEOUT_S = 3600.0        # reading a 70B checkpoint's slice from network storage
# A shard that dies is not restarted behind the engine's back: the group fails and the replica is replaced.
ACTOR_OPTIONS = {"max_restarts": 0, "max_task_retries": 0}


@functools.cache
def _actor_class(worker_class: type):
    return ray.remote(**ACTOR_OPTIONS)(worker_class)


def ensure_ray() -> None:
    """Join the Ray cluster this process belongs to, or start a private one.

    Already initialised (a Serve replica, a driver that called ray.init): nothing to do. RAY_ADDRESS set
    (`auto` for the cluster `ray start` brought up on this machine): join it. Otherwise start a private local
    cluster whose ports stay on loopback; joining a cluster is never implicit, so a stray one on the machine
    is never borrowed.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
    log.info("Ray: %s", ray.get_runtime_context().gcs_address)


def microbatches(step: StepInput, pp: int, num_microbatches: int | None) -> list[StepInput]:
    """The micro-batches one step runs as (see the module docstring)."""
    if pp == 1:
        return [step]
    if num_microbatches is None:
        num_microbatches = pp if step.num_tokens >= MICROBATCH_MIN_TOKENS * pp else 1
    return step.split(num_microbatches) if num_microbatches > 1 else [step]


def _explain(error: BaseException, what: str, timeout: float | None) -> str:
    if isinstance(error, (ray.exceptions.GetTimeoutError, ray.exceptions.RayChannelTimeoutError)):
        return f"{what} timed out after {timeout:.0f}s (a shard is hung, or a collective is waiting on a dead peer)"
    if isinstance(error, ray.exceptions.RayActorError):
        return f"a shard worker died during {what} ({error.__class__.__name__})"
    if isinstance(error, ray.exceptions.RayTaskError):
        return f"a shard worker failed during {what}: {error.cause!r}"
    if isinstance(error, ray.exceptions.RayChannelError):
        return f"the compiled graph's channels closed during {what} (a shard died?)"
    return f"{what} failed: {error!r}"


class RayExecutor:
    worker_class: type = ShardWorker     # each shard's actor class (a subclass may stand in for it)

    def __init__(self, path: str, cfg: ModelConfig, *, tensor_parallel_size: int, pipeline_parallel_size: int,
                 dtype: torch.dtype, max_model_len: int, engine_config) -> None:
        tp, pp = tensor_parallel_size, pipeline_parallel_size
        check_tensor_parallel(cfg, tp)
        layer_ranges = partition_layers(cfg.num_hidden_layers, pp, engine_config.pp_layer_partition)
        self.cfg, self.tp, self.pp = cfg, tp, pp
        self.timeout_s = float(engine_config.collective_timeout_s)
        self.num_microbatches = engine_config.num_microbatches   # None: auto (see microbatches())
        if self.num_microbatches is not None and self.num_microbatches < 1:
            raise InvalidRequestError("num_microbatches", f"must be >= 1, got {self.num_microbatches}")
        self.last_rank = (pp - 1) * tp     # the shard that returns the logits
        self.workers: list = []
        self.init_method = ""              # where the group met (distributed.rendezvous)
        self.placement: ShardPlacement | None = None
        self.mode = "tasks"
        self._dag = None
        self._dead: str | None = None
        ensure_ray()
        self.placement = place_shards(tp, pp, engine_config.resources_per_shard, engine_config.placement_strategy)
        try:
            for p, (start, end) in enumerate(layer_ranges):
                for t in range(tp):
                    rank = p * tp + t
                    shard = ShardInfo(tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, layer_start=start, layer_end=end)
                    self.workers.append(_actor_class(self.worker_class).options(
                        scheduling_strategy=self.placement.scheduling(rank), **self.placement.actor_options(rank),
                    ).remote(cfg, shard, dtype, max_model_len, engine_config.block_size,
                             engine_config.kv_cache_dtype))
            # A file when the group shares one node, else rank 0's node at a port free there (distributed.py).
            self.init_method = rendezvous(self._get([w.node_address.remote() for w in self.workers],
                                                    "shard start", STARTUP_TIMEOUT_S))
            devices = self._get([w.init.remote(self.init_method, self.timeout_s) for w in self.workers],
                                "process-group init", STARTUP_TIMEOUT_S)
            self.device_type, backend = devices[0]
            log.info("loading %s on %d shards (TP%d × PP%d, %s)", path, tp * pp, tp, pp, backend)
            self._get([w.load_weights.remote(path) for w in self.workers], "weight loading", LOAD_TIMEOUT_S)
            budget = engine_config.cache_budget()
            # All shards share the engine's logical block ids: the smallest budget decides.
            self.num_blocks = min(self._get([w.num_blocks.remote(budget) for w in self.workers], "KV sizing"))
            self._get([w.allocate_kv_cache.remote(self.num_blocks) for w in self.workers], "KV allocation",
                      STARTUP_TIMEOUT_S)
            wanted = engine_config.use_compiled_graph
            if wanted is None:  # auto: see the module docstring
                wanted = None if self.device_type == "cuda" else False
            self._setup_compiled_graph(wanted)
        except BaseException:
            self.shutdown()
            raise
        log.info("shard group ready: TP%d × PP%d, %d KV blocks per shard, %s", tp, pp, self.num_blocks, self.mode)

    def _setup_compiled_graph(self, wanted: bool | None) -> None:
        if wanted is False:
            return
        try:
            from ray.dag import InputNode, MultiOutputNode
            with InputNode() as step:
                dag = MultiOutputNode([w.execute.bind(step) for w in self.workers])
            self._dag = dag.experimental_compile(_submit_timeout=self.timeout_s,
                                                 _max_inflight_executions=max(self.num_microbatches or 1, self.pp) + 1)
            self.mode = "compiled"
        except Exception as e:  # noqa: BLE001 - any failure to compile: plain actor calls still work
            if wanted:
                raise EngineUnavailableError(f"could not compile the shard group's Ray graph: {e!r}") from e
            log.warning("Ray compiled graph unavailable (%r); using plain actor calls", e)

    # ---- waiting with deadlines ------------------------------------------------------------------
    def _get(self, refs, what: str, timeout: float | None = None):
        """ray.get with a deadline that fails fast: the first failed shard raises, without waiting for the
        others (which may be blocked in a collective with it until the timeout)."""
        timeout = self.timeout_s if timeout is None else timeout
        single = not isinstance(refs, list)
        pending = [refs] if single else list(refs)
        deadline = time.monotonic() + timeout
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise ray.exceptions.GetTimeoutError(f"{len(pending)} results pending")
                ray.get(ready)  # raises the shard's error, if any
            return ray.get(refs)
        except Exception as e:  # noqa: BLE001 - every failure of the group is the same to the engine
            self._dead = _explain(e, what, timeout)
            raise EngineUnavailableError(self._dead) from e

    def _raise_if_dead(self) -> None:
        if self._dead:
            raise EngineUnavailableError(f"shard group is down: {self._dead}")

    # ---- Executor interface ----------------------------------------------------------------------
    def execute(self, step: StepInput) -> torch.Tensor:
        self._raise_if_dead()
        micro = microbatches(step, self.pp, self.num_microbatches)
        if self._dag is not None:
            logits = self._execute_compiled(micro)
        else:
            logits = self._execute_tasks(micro)
        # Copy out of Ray's (read-only, shared) buffers: the sampler may write into the logits.
        return torch.from_numpy(logits[0].copy() if len(logits) == 1 else np.concatenate(logits))

    def _execute_tasks(self, micro: list[StepInput]) -> list[np.ndarray]:
        per_mb = [[w.execute.remote(mb) for w in self.workers] for mb in micro]  # all submitted before any wait
        results = self._get([r for refs in per_mb for r in refs], "a step")
        n = len(self.workers)
        return [results[i * n + self.last_rank] for i in range(len(micro))]

    def _execute_compiled(self, micro: list[StepInput]) -> list[np.ndarray]:
        deadline = time.monotonic() + self.timeout_s
        try:
            refs = [self._dag.execute(mb) for mb in micro]
            return [ray.get(r, timeout=max(0.0, deadline - time.monotonic()))[self.last_rank] for r in refs]
        except Exception as e:  # noqa: BLE001
            self._dead = _explain(e, "a step", self.timeout_s)
            raise EngineUnavailableError(self._dead) from e

    def check_health(self) -> None:
        self._raise_if_dead()
        self._get([w.ping.remote() for w in self.workers], "health check")

    def shard_stats(self) -> list[dict]:
        self._raise_if_dead()
        return self._get([w.stats.remote() for w in self.workers], "stats")

    def timelines(self) -> list[list[tuple[float, float, int]]]:
        """Each shard's recent compute intervals (wall clock), by global rank."""
        return self._get([w.recent_timeline.remote() for w in self.workers], "timelines")

    def shutdown(self) -> None:
        dag, self._dag = self._dag, None
        if dag is not None and not self._dead:
            try:  # a healthy graph stops its loops cleanly before the actors go
                dag.teardown()
            except Exception as e:  # noqa: BLE001
                log.debug("compiled graph teardown: %s", e)
        if self.workers and not self._dead:
            try:  # best effort: a group that met through a file leaves none behind
                ray.get(self.workers[0].forget_rendezvous.remote(), timeout=5)
            except Exception as e:  # noqa: BLE001
                log.debug("rendezvous clean-up: %s", e)
        # A dead group cannot remove its file; the driver can when it shares the group's node (else: no such file).
        remove_rendezvous_file(self.init_method)
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        if dag is not None and self._dead:
            # The actors are gone now, so tearing down cannot block on a shard stuck in a collective.
            dag_log = logging.getLogger("ray.dag.compiled_dag_node")
            level = dag_log.level
            dag_log.setLevel(logging.CRITICAL)
            try:
                dag.teardown()
            except Exception:  # noqa: BLE001
                pass
            finally:
                dag_log.setLevel(level)
        self.workers = []
        if self.placement is not None:
            self.placement.release()
            self.placement = None
        self._dead = self._dead or "shut down"
