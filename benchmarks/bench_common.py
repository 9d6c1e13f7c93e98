"""Pieces the `herd bench` scenarios share: percentiles, a private local Ray + Serve + herd app, a temporary demo
checkpoint, replica sampling from serve.status(), a grpc.aio streaming client that times every token, and the
closed-loop driver that keeps N streams in flight.

Nothing here is a scenario itself: serve_bench.py, load_bench.py and soak_bench.py are.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional, Sequence, TextIO

from cluster.local_ray import DEFAULT_SERVE_TRANSPORT

BENCH_MODEL = "bench"


# ---- figures ------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> Optional[float]:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100.0 * len(ordered))))
    return ordered[rank - 1]


def ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000, 2)


def p50_p99_ms(values_s: list[float], name: str) -> dict[str, Optional[float]]:
    """{name_p50_ms, name_p99_ms} of values in seconds."""
    return {f"{name}_p50_ms": ms(percentile(values_s, 50)), f"{name}_p99_ms": ms(percentile(values_s, 99))}


def log(msg: str) -> None:
    """Progress goes to stderr: stdout carries the one JSON report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


_report_streams: list[TextIO] = []       # the real stdout while stdout_reserved_for_report() is active


@contextlib.contextmanager
def stdout_reserved_for_report() -> Iterator[None]:
    """Inside, whatever writes to stdout (Ray's INFO lines, worker processes that inherit the descriptor, C
    libraries, a stray print) goes to stderr, and only `write_json` writes to the real stdout: so
    `herd bench ... > report.json` holds exactly one JSON document. `herd bench` runs every scenario in it."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _report_streams.append(real)
    try:
        yield
    finally:
        _report_streams.pop()
        sys.stdout.flush()
        real.flush()
        os.dup2(real.fileno(), 1)
        real.close()


def report_stream() -> TextIO:
    """Where a report printed to stdout goes: the real stdout (see stdout_reserved_for_report)."""
    return _report_streams[-1] if _report_streams else sys.stdout


def write_json(report: dict[str, Any], path: Optional[str | Path]) -> None:
    """The JSON report, once: into the file `path` (logged), else to stdout."""
    text = json.dumps(report, indent=2)
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"wrote {path}")
    else:
        print(text, file=report_stream(), flush=True)


def write_report(report: dict[str, Any], out: Optional[str], filename: str) -> None:
    """The JSON report: `out`/filename when the folder `out` is given, else stdout."""
    write_json(report, Path(out) / filename if out else None)


def figure_path(out: Optional[str], filename: str) -> Path:
    """Where a PNG goes: `out`, or the current folder when the JSON goes to stdout."""
    return Path(out or ".") / filename


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    pyplot().close(fig)
    return path


# ---- a private cluster --------------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports, free now. Their sockets are held open together: two free_port() calls in a
    row sometimes got the same port back, and a config with it twice is refused (grpc_port and http_port)."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    return free_ports(1)[0]


def scratch_dir(prefix: str = "herd-bench-") -> Path:
    """A new temporary folder that is removed when this process exits (a generated checkpoint is hundreds of
    MB: a benchmark must not leave it behind, however it ends)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextlib.contextmanager
def demo_checkpoint(shape: str, model: Optional[str] = None) -> Iterator[str]:
    """`model` if given, else a demo checkpoint of `shape` in a temporary folder that is removed afterwards."""
    if model:
        yield model
        return
    from workers.demo import write_demo_checkpoint

    tmp = scratch_dir()
    try:
        path = str(tmp / shape)
        write_demo_checkpoint(path, shape)
        yield path
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_ray(num_cpus: Optional[int] = None, serve_transport: str = DEFAULT_SERVE_TRANSPORT) -> Iterator[None]:
    """A private Ray with every port on 127.0.0.1, as `herd serve` starts it (cluster.local_ray; never joins
    another); it ends on the way out, Serve in it (no serve.shutdown() needed: the controller and proxies go with
    their Ray). serve_transport: the cluster config's, for the config that will be served in it
    (cluster_config)."""
    import ray

    from cluster.local_ray import start_local_ray

    start_local_ray(num_cpus=num_cpus or max(2, os.cpu_count() or 2), include_dashboard=False,
                    log_to_driver=os.environ.get("HERD_BENCH_RAY_LOGS") == "1", serve_transport=serve_transport)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_config(models: list[dict[str, Any]], **extra) -> dict[str, Any]:
    """A loopback ClusterConfig dict on free ports."""
    grpc_port, http_port = free_ports(2)
    return {"host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port, "models": models, **extra}


def start_herd(cfg_dict: dict[str, Any]) -> str:
    """serve.start + the herd app from `cfg_dict` (inside local_ray); the gRPC address. serve.run returns once
    the application is RUNNING (and raises if it failed to deploy)."""
    from ray import serve

    from cluster.app import APP_NAME, build_app, serve_start_options
    from cluster.config import ClusterConfig

    cfg = ClusterConfig.from_dict(cfg_dict)
    serve.start(**serve_start_options(cfg))
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    return f"127.0.0.1:{cfg.grpc_port}"


def model_handle(model: str):
    from ray import serve

    from cluster.app import APP_NAME, deployment_name

    return serve.get_deployment_handle(deployment_name(model), app_name=APP_NAME)


def model_stats(model: str, timeout_s: float = 30) -> dict[str, Any]:
    """ModelServer.stats() of one replica of `model` (engine counters, kv_blocks_free, replica_id)."""
    return model_handle(model).stats.remote().result(timeout_s=timeout_s)


def replica_actors(model: str) -> list[dict[str, Any]]:
    """The ALIVE replica actors of `model`'s deployment: {name, pid, actor_id}. Read from the GCS actor table
    (no dashboard needed); `name` works with ray.get_actor(name, namespace="serve")."""
    import ray._private.state as state

    from cluster.app import APP_NAME, deployment_name

    marker = f"{APP_NAME}#{deployment_name(model)}#"
    out = []
    for actor_id, info in state.actors().items():
        name = info.get("Name") or ""
        if info.get("State") == "ALIVE" and marker in name:
            out.append({"name": name, "pid": info.get("Pid"), "actor_id": actor_id})
    return out


def serve_process_pids(model: str) -> dict[str, list[int]]:
    """The pids of the served path's processes, by role: the model's replicas, their engine processes
    (workers.engine_process), the ingress replicas, Serve's proxies and controller (from the GCS actor table),
    and this bench's own process (the clients)."""
    import os

    import ray._private.state as state

    from cluster.app import APP_NAME, INGRESS_NAME, deployment_name

    roles = {"model_replica": f"{APP_NAME}#{deployment_name(model)}#", "ingress": f"{APP_NAME}#{INGRESS_NAME}#",
             "serve_proxy": "SERVE_PROXY_ACTOR", "serve_controller": "SERVE_CONTROLLER_ACTOR"}
    pids: dict[str, list[int]] = {role: [] for role in roles}
    for info in state.actors().values():
        name = info.get("Name") or ""
        if info.get("State") != "ALIVE" or not info.get("Pid"):
            continue
        for role, marker in roles.items():
            if marker in name:
                pids[role].append(int(info["Pid"]))
    pids["engine_process"] = engine_process_pids(pids["model_replica"])
    pids["bench_client"] = [os.getpid()]
    return pids


def engine_process_pids(replica_pids: list[int]) -> list[int]:
    """The engine processes (workers.engine_process) that these model replicas started."""
    import psutil

    found = []
    for pid in replica_pids:
        try:
            found += [c.pid for c in psutil.Process(pid).children()
                      if "workers.engine_process" in " ".join(c.cmdline())]
        except psutil.Error:  # the replica went away meanwhile
            pass
    return found


class ProcessCpu:
    """CPU time used by groups of processes between two snapshots, in cores (CPU seconds per wall second):
    where a machine's cores go while the served path streams. `other` is the rest of the machine (raylet, GCS,
    other work)."""

    def __init__(self, groups: dict[str, list[int]]):
        import psutil

        self._procs = {role: [psutil.Process(pid) for pid in pids] for role, pids in groups.items()}
        self._start = self._snapshot()

    def _snapshot(self) -> tuple[float, dict[str, float], float]:
        import psutil

        used = {}
        for role, procs in self._procs.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:  # a process that went away counts what it used before
                    pass
            used[role] = total
        machine = psutil.cpu_times()
        return time.monotonic(), used, machine.user + machine.system + getattr(machine, "nice", 0.0)

    def cores(self) -> dict[str, float]:
        """Cores used by each group since the snapshot before (and starts the next interval)."""
        t1, used1, machine1 = self._snapshot()
        t0, used0, machine0 = self._start
        self._start = (t1, used1, machine1)
        wall = max(t1 - t0, 1e-9)
        out = {role: round((used1[role] - used0[role]) / wall, 2) for role in used1}
        out["machine"] = round((machine1 - machine0) / wall, 2)
        out["other"] = round(out["machine"] - sum(v for k, v in out.items() if k != "machine"), 2)
        return out


# The processes a request crosses in front of the engine: Serve's proxy, the ingress, the model replica.
SERVING_PATH_ROLES = ("serve_proxy", "ingress", "model_replica")


def cpu_ms_per_request(cores: dict[str, float], wall_s: float, requests: int) -> dict[str, float]:
    """CPU milliseconds each group of ProcessCpu.cores() spent per request over `wall_s` (the machine's and
    `other` left out), and `serving_path`, the sum over SERVING_PATH_ROLES where they were measured: what one
    request costs in front of the engine, the figure that sizes the serving path's CPUs (docs/serving.md)."""
    if requests <= 0:
        return {}
    out = {role: round(c * wall_s / requests * 1000, 2) for role, c in cores.items()
           if role not in ("machine", "other")}
    if any(role in out for role in SERVING_PATH_ROLES):
        out["serving_path"] = round(sum(out.get(role, 0.0) for role in SERVING_PATH_ROLES), 2)
    return out


# ---- replica timeline ---------------------------------------------------------------------------------------
@dataclass
class Timeline:
    t: list[float] = field(default_factory=list)
    replicas: list[int] = field(default_factory=list)     # RUNNING
    wanted: list[int] = field(default_factory=list)       # RUNNING + starting (what the autoscaler asked for)
    in_flight: list[int] = field(default_factory=list)
    phases: list[tuple[str, float, float]] = field(default_factory=list)


def replica_counts(app_name: str, deployment: str) -> tuple[int, int]:
    """(running, running + starting) replicas of a deployment, from serve.status()."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0, 0
    states = {str(getattr(k, "value", k)): n for k, n in app.deployments[deployment].replica_states.items()}
    running = states.get("RUNNING", 0)
    return running, running + sum(states.get(k, 0) for k in ("STARTING", "UPDATING", "RECOVERING"))


class TimelineSampler:
    """Samples (running, wanted) replicas and the caller's in-flight count every `period_s` into a Timeline,
    in a thread, from `start()` (t = 0) until `stop()`."""

    def __init__(self, replicas_now: Callable[[], tuple[int, int]], in_flight: Callable[[], int],
                 period_s: float = 0.5):
        self.tl, self.period_s = Timeline(), period_s
        self._replicas_now, self._in_flight = replicas_now, in_flight
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> "TimelineSampler":
        self.t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> Timeline:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.tl

    def _run(self) -> None:
        tl = self.tl
        while not self._stop.is_set():
            try:
                running, wanted = self._replicas_now()
            except Exception:  # noqa: BLE001 - a status hiccup repeats the last sample, not a failed bench
                running, wanted = (tl.replicas[-1], tl.wanted[-1]) if tl.replicas else (0, 0)
            tl.t.append(round(self.now(), 3))
            tl.replicas.append(running)
            tl.wanted.append(wanted)
            tl.in_flight.append(self._in_flight())
            self._stop.wait(self.period_s)


# ---- streaming client ---------------------------------------------------------------------------------------
@dataclass
class CompletionOutput:
    """What one completion of a captured stream said (`AioTarget.generate(..., capture=True)`)."""
    text: str = ""
    tokens: int = 0
    logprobs: int = 0                       # TokenLogprob entries received (one per token when asked for)
    finish_reason: str = ""
    tool_calls: list[tuple[str, str]] = field(default_factory=list)   # (name, arguments JSON text)


@dataclass
class StreamResult:
    """One streamed request, timed at the client. Times are seconds; `start` is relative to the run's t0."""
    start: float = 0.0
    code: str = "OK"                        # gRPC status name (OK, RESOURCE_EXHAUSTED, CANCELLED, ...)
    ttft_s: Optional[float] = None
    latency_s: Optional[float] = None       # call to last chunk / error
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)  # inter-token latency samples (one per token after the first)
    kind: str = "normal"                    # workload class (soak): normal / cancel / invalid / deadline
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, relative to t0 as `start`; tokens)
    feature: Optional[str] = None           # soak: the served feature the request used (benchmarks/soak_features.py)
    completions: Optional[dict[int, CompletionOutput]] = None   # by index, when the call captured its output
    violation: Optional[str] = None         # soak: why its output broke the feature's contract, if it did
    whole_outputs: int = 0                  # soak: completions checked whole (ended by stop / tool_calls)

    def on_chunk(self, now: float, n_tokens: int, last_chunk_at: Optional[float]) -> None:
        """Record a chunk of `n_tokens` arriving at `now` (seconds since this call began)."""
        if n_tokens <= 0:
            return
        self.chunks.append((self.start + now, n_tokens))
        if self.ttft_s is None:
            self.ttft_s = now
            self.gaps_s.extend([0.0] * (n_tokens - 1))
        elif last_chunk_at is not None:
            self.gaps_s.extend([(now - last_chunk_at) / n_tokens] * n_tokens)
        self.tokens += n_tokens

    def capture(self, chunk: Any) -> None:
        """Adds a GenerateResponse's text, tokens, logprobs, finish reason and tool calls to its completion."""
        out = self.completions.setdefault(chunk.index, CompletionOutput())
        out.text += chunk.text
        out.tokens += len(chunk.token_ids)
        out.logprobs += len(chunk.logprobs)
        out.finish_reason = chunk.finish_reason or out.finish_reason
        out.tool_calls.extend((c.name, c.arguments) for c in chunk.tool_calls)


def steady_tokens_per_s(results: list[StreamResult]) -> Optional[float]:
    """Tokens per second of a closed-loop run while all its streams were busy: from the first request's end (the
    first wave is in; each end now starts the next request) to the last request's start (after it the streams
    drain one by one). None when there is no such window (a single wave). The whole run's tok/s also counts the
    first wave's ramp-up, which is a burst figure rather than a rate (a server under steady load is past it)."""
    ends = [r.start + r.latency_s for r in results if r.latency_s is not None]
    if not ends:
        return None
    begin, end = min(ends), max(r.start for r in results)
    if end - begin <= 0:
        return None
    tokens = sum(n for r in results for at, n in r.chunks if begin <= at < end)
    return round(tokens / (end - begin), 2)


def stream_summary(results: list[StreamResult], wall_s: float) -> dict[str, Any]:
    """tok/s (the whole run's, and while all streams were busy), TTFT and inter-token p50/p99 of the OK streams;
    outcome counts by status code."""
    ok = [r for r in results if r.code == "OK"]
    codes: dict[str, int] = {}
    for r in results:
        codes[r.code] = codes.get(r.code, 0) + 1
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results), "ok": len(ok), "errors": {k: v for k, v in codes.items() if k != "OK"},
        "tokens": tokens, "tokens_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "steady_tokens_per_s": steady_tokens_per_s(results),
        **p50_p99_ms([r.ttft_s for r in ok if r.ttft_s is not None], "ttft"),
        **p50_p99_ms([g for r in ok for g in r.gaps_s], "itl"),
        **p50_p99_ms([r.latency_s for r in ok if r.latency_s is not None], "latency"),
        "wall_s": round(wall_s, 3),
    }


class AioTarget:
    """herd's Generate over grpc.aio: every stream in one event loop, spread over a few HTTP/2 connections."""

    def __init__(self, address: str, model: str, api_key: Optional[str] = None, channels: int = 4):
        import grpc

        from cluster.pb import inference_pb2 as pb
        from cluster.pb import inference_pb2_grpc as pb_grpc

        self.grpc, self.pb, self.model = grpc, pb, model
        opts = [("grpc.use_local_subchannel_pool", 1)]  # separate connections, not one shared subchannel
        self.channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(max(1, channels))]
        self.stubs = [pb_grpc.InferenceStub(c) for c in self.channels]
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._next = 0

    async def close(self) -> None:
        for c in self.channels:
            await c.close()

    async def wait_ready(self, timeout_s: float = 120.0) -> Any:
        """Waits until ListModels lists the model; its ModelInfo."""
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            try:
                resp = await self.stubs[0].ListModels(self.pb.ListModelsRequest(), metadata=self.metadata,
                                                      timeout=10)
                for m in resp.models:
                    if m.name == self.model:
                        return m
                last = f"model {self.model!r} not listed"
            except self.grpc.aio.AioRpcError as e:
                last = f"{e.code().name}: {e.details()}"
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.model!r} not served within {timeout_s:.0f} s ({last})")

    async def generate(self, prompt: list[int], max_tokens: int, *, timeout_s: float = 120.0,
                       cancel_after_tokens: Optional[int] = None, t0: float = 0.0, capture: bool = False,
                       **sampling) -> StreamResult:
        """One greedy ignore_eos stream (unless `sampling` says otherwise); `cancel_after_tokens` cancels it
        from the client side once that many tokens arrived (code CANCELLED_BY_CLIENT); `capture` keeps what
        each completion said in `StreamResult.completions`."""
        pb = self.pb
        req = pb.GenerateRequest(model=self.model, token_ids=pb.TokenIds(ids=prompt),
                                 sampling=self._sampling(max_tokens, sampling))
        return await self._stream(lambda stub: stub.Generate(req, metadata=self.metadata, timeout=timeout_s),
                                  cancel_after_tokens, t0, capture)

    async def chat(self, messages: list[Any], max_tokens: int, *, tools: Sequence[Any] = (),
                   tool_choice: Any = None, timeout_s: float = 120.0, cancel_after_tokens: Optional[int] = None,
                   t0: float = 0.0, capture: bool = False, **sampling) -> StreamResult:
        """One Chat stream (`messages`, `tools`: herd.v1 ChatMessage / Tool), otherwise as `generate`."""
        req = self.pb.ChatRequest(model=self.model, messages=messages, tools=tools, tool_choice=tool_choice,
                                  sampling=self._sampling(max_tokens, sampling))
        return await self._stream(lambda stub: stub.Chat(req, metadata=self.metadata, timeout=timeout_s),
                                  cancel_after_tokens, t0, capture)

    def _sampling(self, max_tokens: int, sampling: dict[str, Any]) -> Any:
        return self.pb.SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                                         **sampling})

    async def _stream(self, start_call: Callable[[Any], Any], cancel_after_tokens: Optional[int], t0: float,
                      capture: bool) -> StreamResult:
        stub = self.stubs[self._next % len(self.stubs)]
        self._next += 1
        start = time.perf_counter()
        res, last = StreamResult(start=start - t0, completions={} if capture else None), None
        call = start_call(stub)
        try:
            async for chunk in call:
                now = time.perf_counter() - start
                res.on_chunk(now, len(chunk.token_ids), last)
                last = now if chunk.token_ids else last
                if capture:
                    res.capture(chunk)
                if cancel_after_tokens is not None and res.tokens >= cancel_after_tokens:
                    call.cancel()
                    res.code = "CANCELLED_BY_CLIENT"
                    break
        except asyncio.CancelledError:
            call.cancel()
            raise
        except self.grpc.aio.AioRpcError as e:
            res.code = e.code().name
        res.latency_s = time.perf_counter() - start
        return res


async def closed_loop(make_call: Callable[[int], Awaitable[StreamResult]], n_requests: Optional[int],
                      concurrency: int, in_flight: Optional[list[int]] = None,
                      run_for_s: Optional[float] = None) -> tuple[list[StreamResult], float]:
    """Runs `make_call(i)` for i = 0, 1, ... keeping `concurrency` calls in flight, until `n_requests` were
    made or (with n_requests None) `run_for_s` seconds have passed (calls in flight then finish); (results, wall)."""
    results: dict[int, StreamResult] = {}
    counter = iter(range(n_requests)) if n_requests is not None else itertools.count()
    t0 = time.perf_counter()

    async def worker() -> None:
        for i in counter:
            if run_for_s is not None and time.perf_counter() - t0 >= run_for_s:
                return
            if in_flight is not None:
                in_flight[0] += 1
            try:
                results[i] = await make_call(i)
            finally:
                if in_flight is not None:
                    in_flight[0] -= 1

    workers = concurrency if n_requests is None else min(concurrency, n_requests)
    await asyncio.gather(*(worker() for _ in range(workers)))
    return [results[i] for i in sorted(results)], time.perf_counter() - t0


class LoopLag:
    """Measures how late the client's event loop wakes (a busy client shows up here, not as server latency)."""

    def __init__(self, period_s: float = 0.01):
        self.period_s, self.lags = period_s, []
        self._task: Optional[asyncio.Task] = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.period_s)
            self.lags.append(max(0.0, time.perf_counter() - t - self.period_s))

    def __enter__(self) -> "LoopLag":
        self.lags = []
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc) -> None:
        if self._task is not None:
            self._task.cancel()

    def summary(self) -> dict[str, Optional[float]]:
        return p50_p99_ms(self.lags, "client_loop_lag")


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`n` distinct random prompts (ids 3..vocab-1): no two share a first block, so no prefix-cache help."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def checkpoint_vocab(path: str) -> int:
    return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])
