"""The model deployment: one Serve replica = one engine: a whole model (by default in a process of its own,
workers.engine_process), or the driver of a TP×PP group (an AsyncEngine in the replica).

Contract with the ingress (and with the router, which reads the token ids from the first positional arg):

    handle.options(stream=True).generate_stream.remote(prompt_token_ids: list[int], sampling: dict,
                                                       request_id: str, cache_salt: int = 0)

yields plain dicts, one per engine step that produced something:

    {"index": int, "token_ids": [...], "text": "...", "logprobs": [...] | None,
     "finish_reason": None | "stop" | "length", "prompt_tokens": int, "cached_tokens": int,
     "completion_tokens": int (of this completion, so far), "prompt_logprobs": [...] (first chunk, if asked)}

`index` tells apart the `sampling["n"]` completions of one request (they interleave); the stream ends when
every one of them has had its chunk with a finish_reason.

or, once and last, `{"error": {"code": "<gRPC code name>", "message": ..., "field": ...}}` when the request
fails (cluster.errors). Errors travel as data, not exceptions: the engine's exceptions do not survive pickling
into a RayTaskError with their fields, and the client must see the field name. An UNAVAILABLE error (the
engine is down) also carries `"actor_id"`, this replica's Ray actor id, so the ingress's retry before the
first token avoids this replica (cluster.unavailable_replicas): it fails fast and looks idle to the router.

Each logprobs entry is `{"logprob": float, "top": [[token_id, logprob], ...]}` (the `sampling["logprobs"]`
most likely tokens, most likely first) for the token at the same position in token_ids.

`cache_salt` (a keyword, non-zero with per-tenant prefix-cache isolation) roots the request's block-hash
chain, in the engine's prefix cache and in the router alike, so tenants never share (or see) cached blocks.

Placement: a replica of a TP·PP = 1 model reserves `resources_per_shard` itself. For TP·PP > 1 the replica owns
a placement group, `[{"CPU": driver_cpus}] + [resources_per_shard] * (TP*PP)` (see cluster.app); the replica
actor sits in bundle 0 and the engine starts its shard actors in the other bundles of the current group.

Readiness: the weights load in `__init__`, so Serve routes nothing to a replica before its engine is up;
`check_health` asks the engine (a dead shard makes the replica unhealthy and Serve replaces it).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, TypedDict

from ray import serve

from cluster import tracing
from cluster.autoscaling import autoscaling_stats
from cluster.deployment_version import model_version
from cluster.errors import ApiError, error_to_dict
from cluster.metrics import ReplicaMetrics
from cluster.request_context import install_request_id_logging, request_id_from, set_request_id
from cluster.routing import RoutingReport, routing_stats
from workers.gc_freeze import freeze_startup_objects

log = logging.getLogger(f"herd.{__name__}")

# GIL switch interval of a model replica's process (Python's default is 5 ms; see ModelServer.__init__).
ENGINE_GIL_SWITCH_INTERVAL_S = 0.0005
# How often engine gauges (KV blocks, queue depth) are pushed to the metrics.
ENGINE_METRICS_PERIOD_S = 2.0


# ---- what crosses the Ray hops to and from a model replica (plain data: pickled, or JSON on the way out) ----
@dataclass(frozen=True)
class ModelSpec:
    """What a model replica needs to build its engine: cluster.app builds it from the model's config and Serve
    pickles it into every replica."""
    name: str
    path: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"
    engine_args: dict[str, Any] = field(default_factory=dict)       # Engine.from_pretrained(**engine_args)
    engine_process: bool = False    # the engine in a process of its own (workers.engine_process), if TP*PP = 1
    engine_cpu_cores: Optional[str] = None  # that process's CPUs (workers.cpu_affinity), e.g. "2-7"
    stream_pacing: dict[str, float] = field(default_factory=dict)   # workers.stream_pacing.StreamPacing(**)
    tracing: Optional[dict[str, Any]] = None                        # cluster.config.TracingConfig, dumped


class ServedModel(TypedDict):
    """What the ingress knows of a model before its replica answers model_info() (cluster.app builds it)."""
    name: str
    path: str
    deployment: str
    tensor_parallel_size: int
    pipeline_parallel_size: int
    autoscaling: bool
    version: str        # the deployment's version (cluster.deployment_version): what its replicas are built from
    own_application: bool   # its deployment is an application of its own (cluster.app.build_model_app), not the
                            # ingress's


class ModelInfo(TypedDict):
    """ModelServer.model_info(): the loaded model, for ListModels, Tokenize and `herd status`."""
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    replica_id: str
    version: str        # of the replica's ModelSpec (cluster.deployment_version)


class ReplicaStats(TypedDict):
    """ModelServer.stats(): workers.EngineStats' counters (tests/test_serve_unit.py holds the keys equal) and
    which replica they are from."""
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_hit_tokens: int
    prompt_tokens: int
    generation_tokens: int
    num_preemptions: int
    prompt_tokens_computed: int
    replica_id: str


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (unit tests)
        return "local"


def _actor_id() -> str | None:
    """This replica's Ray actor id (hex), as Ray's actor errors name it; None outside an actor."""
    import ray

    try:
        return ray.get_runtime_context().get_actor_id()
    except Exception:  # noqa: BLE001 - Ray not initialised (unit tests)
        return None


def logprobs_to_wire(token_ids: list[int], logprobs: list[dict[int, float]] | None,
                     num_top: int) -> list[dict] | None:
    """Engine logprobs -> the stream's JSON-friendly form. The engine gives, per new token, {token_id: logprob}
    for the `num_top` most likely tokens plus the sampled one; "top" keeps only the `num_top` most likely."""
    if logprobs is None:
        return None
    out = []
    for tok, entry in zip(token_ids, logprobs):
        top = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
        out.append({"logprob": float(entry.get(tok, float("nan"))),
                    "top": [[int(t), float(lp)] for t, lp in top]})
    return out


def prompt_logprobs_to_wire(prompt_token_ids: list[int], logprobs: list[dict[int, float] | None],
                            num_top: int) -> list[dict | None]:
    """Prompt logprobs (None for the first position, which has no context) in logprobs_to_wire's form."""
    return [None if entry is None else logprobs_to_wire([tok], [entry], num_top)[0]
            for tok, entry in zip(prompt_token_ids, logprobs)]


# A chunk key that never leaves the replica: the engine's first-scheduled time, for the trace's queue span.
_SCHEDULED_AT = "_scheduled_at"


def runs_engine_process(spec: ModelSpec) -> bool:
    """A replica of `spec` runs its engine in a process of its own (workers.engine_process): a whole model with
    engine_process on. A TP x PP group's driver stays in the replica, whose Ray context its shard actors need."""
    return spec.engine_process and spec.tensor_parallel_size * spec.pipeline_parallel_size == 1


def load_engine(spec: ModelSpec):
    """The engine a replica of `spec` streams from (blocks while the model loads): an EngineProcessClient or an
    AsyncEngine (runs_engine_process), with the spec's stream pacing. `herd bench load --engine-hop-only`
    drives the very same object."""
    from workers import AsyncEngine
    from workers.engine_process import EngineProcessClient
    from workers.stream_pacing import StreamPacing

    if runs_engine_process(spec):
        front, where = EngineProcessClient, {"cpu_cores": spec.engine_cpu_cores}
    else:
        front, where = AsyncEngine, {}
    return front.from_pretrained(
        spec.path, tensor_parallel_size=spec.tensor_parallel_size, pipeline_parallel_size=spec.pipeline_parallel_size,
        dtype=spec.dtype, pacing=StreamPacing(**spec.stream_pacing), **where, **spec.engine_args)


class ModelServer:
    """A Serve replica serving one model with herd's engine, as `spec` says (built by cluster.app)."""

    async def __init__(self, spec: ModelSpec):
        # An engine thread in this process shares its GIL with Serve's and Ray's Python threads (streaming each
        # message out); it releases the GIL in every torch op and, at Python's default 5 ms switch interval,
        # can wait that long to get it back. A shorter interval hands it back sooner. (An engine process has a
        # GIL of its own.)
        sys.setswitchinterval(ENGINE_GIL_SWITCH_INTERVAL_S)
        self.spec = spec
        self.version = model_version(spec)   # what model_info() reports (cluster.deployment_version)
        self.name = spec.name
        self.replica_id = _replica_id()
        self.actor_id = _actor_id()
        install_request_id_logging()  # a request's log lines name its id (cluster.request_context)
        tracing.configure(spec.tracing, f"model-{self.name}")
        tp, pp = spec.tensor_parallel_size, spec.pipeline_parallel_size
        log.info("model %s: loading %s (TP%d x PP%d, dtype %s%s) ...", self.name, spec.path, tp, pp, spec.dtype,
                 ", engine in its own process" if runs_engine_process(spec) else "")
        t0 = time.monotonic()
        # Blocking load in a thread: the replica's event loop stays responsive while weights load.
        self.engine = await asyncio.to_thread(load_engine, spec)
        stats = self.engine.stats()
        log.info("model %s: loaded in %.1fs; max_model_len %d, %d KV blocks of %d tokens", self.name,
                 time.monotonic() - t0, self.engine.max_model_len, stats.kv_blocks_total, self.engine.block_size)
        self.metrics = ReplicaMetrics(self.name, self.replica_id,
                                      prefix_caching=bool(spec.engine_args.get("enable_prefix_caching", True)))
        freeze_startup_objects(f"model {self.name}")   # (workers.gc_freeze) no full collection walks them again
        loop = asyncio.get_running_loop()
        self._background = [loop.create_task(self._push_engine_metrics()),
                            loop.create_task(self._return_freed_host_memory())]

    # ---- requests ------------------------------------------------------------------------------------
    async def generate_stream(self, prompt_token_ids: list[int], sampling: dict[str, Any], request_id: str,
                              cache_salt: int = 0, context: dict[str, str] | None = None
                              ) -> AsyncIterator[dict[str, Any]]:
        """The request's chunks (module doc). `context`: the request's id and trace context from the ingress
        (cluster.request_context.outgoing_context): this request's log lines name the id, and with tracing
        on its spans continue the ingress's trace."""
        set_request_id(request_id_from(context))
        chunks = self._chunks(prompt_token_ids, sampling, request_id, cache_salt)
        span = tracing.start_span("herd.replica.generate", context, {
            "herd.model": self.name, "herd.replica": self.replica_id,
            "herd.request_id": request_id_from(context) or request_id}, kind="server")
        started, first_token_at, error, last = time.monotonic(), None, None, {}
        scheduled_at = None  # when the engine first scheduled it (its queue wait ended)
        last_at = None   # when the last chunk came from the engine (the caller may close us later)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    last_at = time.monotonic()
                    scheduled = chunk.pop(_SCHEDULED_AT, None)
                    if scheduled_at is None:
                        scheduled_at = scheduled
                    if "error" in chunk:
                        error = chunk["error"]["code"]
                        if error == "UNAVAILABLE":
                            chunk["error"]["actor_id"] = self.actor_id
                    else:
                        if first_token_at is None and chunk["token_ids"]:
                            first_token_at = last_at
                        last = chunk
                    yield chunk
        except asyncio.CancelledError:
            error, last_at = "CANCELLED", None
            raise
        finally:
            finished = last_at if last_at is not None else time.monotonic()
            # One line per request (as Serve's access log), with the figures an operator asks about first.
            log.info("model %s: request %s %s: %s prompt tokens (%s cached), %s generated, first token %s, "
                     "total %.0f ms", self.name, request_id, error or last.get("finish_reason") or "ended",
                     last.get("prompt_tokens", "?"), last.get("cached_tokens", "?"),
                     last.get("completion_tokens", 0),
                     f"{1000 * (first_token_at - started):.0f} ms" if first_token_at is not None else "-",
                     1000 * (finished - started))
            if span is not None:
                tracing.add_engine_spans(span, submitted_s=started, first_token_s=first_token_at,
                                         finished_s=finished, scheduled_s=scheduled_at, attributes={
                                             "herd.prompt_tokens": last.get("prompt_tokens"),
                                             "herd.cached_tokens": last.get("cached_tokens"),
                                             "herd.completion_tokens": last.get("completion_tokens")})
                tracing.end_span(span, error=error)

    async def _chunks(self, prompt_token_ids: list[int], sampling: dict[str, Any], request_id: str,
                      cache_salt: int = 0) -> AsyncIterator[dict[str, Any]]:
        from workers import SamplingParams
        from workers.errors import HerdError

        t_start = time.monotonic()
        self.metrics.on_request()
        completion_tokens: dict[int, int] = {}  # per completion (n > 1: several, told apart by d.index)
        last_token_at: float | None = None
        try:
            params = SamplingParams.from_dict(sampling)
            unfinished = params.n
            self.engine.validate(prompt_token_ids, params)
            salt = {"cache_salt": int(cache_salt)} if cache_salt else {}
            stream = self.engine.generate(list(prompt_token_ids), params, request_id=request_id, **salt)
            # aclosing: if we are cancelled (client gone), the engine's generator is closed at once, which
            # aborts the sequence and frees its KV blocks, instead of whenever it is garbage collected.
            async with contextlib.aclosing(stream):
                async for d in stream:
                    now = time.monotonic()
                    if d.token_ids:
                        if last_token_at is None:
                            self.metrics.on_first_token(now - t_start)
                            # Tokens that came merged with the first (the loop fell behind the engine) are gaps
                            # of 0 s: every token after the first is one inter-token gap, as vLLM counts them.
                            self.metrics.on_token(0.0, len(d.token_ids) - 1)
                        else:
                            self.metrics.on_token(now - last_token_at, len(d.token_ids))
                        last_token_at = now
                    completion_tokens[d.index] = completion_tokens.get(d.index, 0) + len(d.token_ids)
                    chunk = {
                        "index": d.index,
                        "token_ids": list(d.token_ids),
                        "text": d.text,
                        "logprobs": logprobs_to_wire(d.token_ids, d.logprobs, params.logprobs or 0),
                        "finish_reason": d.finish_reason,
                        "prompt_tokens": d.num_prompt_tokens,
                        "cached_tokens": d.num_cached_tokens,
                        "completion_tokens": completion_tokens[d.index],
                    }
                    if d.prompt_logprobs is not None:
                        chunk["prompt_logprobs"] = prompt_logprobs_to_wire(
                            prompt_token_ids, d.prompt_logprobs, params.prompt_logprobs or 0)
                    if d.scheduled_at is not None:  # this process's clock: generate_stream takes it out
                        chunk[_SCHEDULED_AT] = d.scheduled_at
                    yield chunk
                    if d.finished:
                        unfinished -= 1
                        if unfinished == 0:  # the request's figures, once, when its last completion ends
                            self.metrics.on_finish(d.num_prompt_tokens, sum(completion_tokens.values()),
                                                   d.num_cached_tokens, e2e_seconds=now - t_start)
        except (HerdError, ApiError) as e:
            err = error_to_dict(e)
            self.metrics.on_error(err["error"]["code"])
            yield err
        except asyncio.CancelledError:
            self.metrics.on_error("CANCELLED")
            raise
        except Exception as e:  # noqa: BLE001 - a bug: log it here, send the client a clean INTERNAL
            log.exception("model %s: request %s failed", self.name, request_id)
            err = error_to_dict(e)
            self.metrics.on_error(err["error"]["code"])
            yield err

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # ---- introspection ------------------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self.name, max_model_len=int(self.engine.max_model_len),
                         vocab_size=int(self.engine.vocab_size), block_size=int(self.engine.block_size),
                         tensor_parallel_size=self.spec.tensor_parallel_size,
                         pipeline_parallel_size=self.spec.pipeline_parallel_size, replica_id=self.replica_id,
                         version=self.version)

    def stats(self) -> ReplicaStats:
        """The engine's counters and KV pool, for operators and tests (free blocks back to start after aborts)."""
        return ReplicaStats(**dataclasses.asdict(self.engine.stats()), replica_id=self.replica_id)

    # ---- Serve hooks ---------------------------------------------------------------------------------
    def check_health(self) -> None:
        self.engine.check_health()  # raises EngineUnavailableError: Serve marks the replica unhealthy

    def record_routing_stats(self) -> RoutingReport:
        """What the PrefixCacheRouter knows this replica by: its prefix cache's block hashes and its load."""
        return routing_stats(self.engine)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Replica-reported load for the autoscaling policy (AutoscalingContext's aggregated metrics)."""
        return autoscaling_stats(self.engine)

    async def _push_engine_metrics(self) -> None:
        while True:
            try:
                self.metrics.update_engine(self.engine.stats())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.debug("engine metrics update failed", exc_info=True)
            await asyncio.sleep(ENGINE_METRICS_PERIOD_S)

    async def _return_freed_host_memory(self) -> None:
        """Every few seconds, hand the pages malloc keeps after frees back to the OS (workers.host_memory): else
        RSS climbs for many minutes under varying load, without a leak."""
        from workers.host_memory import TRIM_PERIOD_S, trim_host_memory

        while True:
            await asyncio.sleep(TRIM_PERIOD_S)
            try:
                if not await asyncio.to_thread(trim_host_memory):
                    return  # not glibc: nothing to do
            except Exception:  # noqa: BLE001 - must never take the replica down
                log.debug("host memory trim failed", exc_info=True)

    def __del__(self):
        # Serve calls __del__ when it stops a replica (after graceful_shutdown_timeout_s for in-flight requests).
        for task in getattr(self, "_background", ()):
            if not task.done():
                task.get_loop().call_soon_threadsafe(task.cancel)  # __del__ may run off the replica's loop
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001
                log.warning("model %s: engine shutdown failed", getattr(self, "name", "?"), exc_info=True)


ModelDeployment = serve.deployment(ModelServer, name="ModelServer")
