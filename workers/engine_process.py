"""The engine core in a process of its own, beside the Serve replica that streams its tokens (vLLM V1's split of
AsyncLLM and EngineCore).

Why: in one process the engine thread shares the GIL with everything that serves the replica's streams (Serve's
event loops, Ray's core worker, message packing). Each of a step's ~50 torch calls releases the GIL and then
waits to take it back, so under load a token cost the engine ~1.8x what it costs the engine alone
(`herd bench load`, docs/serving.md). In its own process the step loop has a GIL to itself; the replica keeps
only the cheap part, handing each stream its deltas.

    replica process (EngineProcessClient)            engine process (`python -m workers.engine_process`)
    generate() -> ("add", token, id, prompt, ...) --> main thread: commands -> the engine thread's queue
    stream closed -> ("close", token, finished)   --> (an unfinished one is aborted wherever it is)
    reader thread <- ("step", [(token, delta)...],  <-- engine thread, once per iteration: every stream's
                      stats, cache snapshot, dead)       paced deltas, the stats, every 0.5 s the cache snapshot
    check_health  <- ("beat", busy_since, dead)     <-- main thread, every HEARTBEAT_PERIOD_S

The engine side is an AsyncEngine whose streams post into an outbox instead of an event loop, so admission,
pacing, aborts and failures behave exactly as in one process; the replica side is an EngineFront, so generate()
and the end of every open stream when the engine dies are the same code as AsyncEngine's. Streams are told
apart by a token the replica picks (not the request id: a refused duplicate id must not touch its live
namesake's deltas).

Failure: the engine process exiting (killed, crashed) ends every open stream with EngineUnavailableError at
once (the reader sees the pipe close) and fails check_health, so Serve replaces the replica. A step running
past step_timeout_s, or an engine process that stops answering, fails check_health the same way. The replica
going away closes the command pipe, and the engine process exits with it: no orphan holds the model's memory.

Only a whole-model replica runs its engine in a process; a TP x PP group's driver stays in the replica, whose
Ray context its shard actors need (cluster.deployment decides). Pipes carry pickles between two processes of
the same replica, started from the same code; nothing from a client is unpickled.
"""
from __future__ import annotations

import itertools
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Sequence

from .async_engine import AsyncEngine, EngineFront, _CallerStream, _Stream, max_held
from .engine import EngineStats, StreamDelta, validate_request
from .errors import EngineUnavailableError, HerdError
from .gc_freeze import freeze_startup_objects
from .sampling import SamplingParams
from .stream_pacing import StreamPacing

log = logging.getLogger(f"herd.{__name__}")

# How often the engine process says it is alive (and whether, and since when, its engine thread is in a step).
HEARTBEAT_PERIOD_S = 0.5
# An engine process silent for this long (no heartbeat, no step) is taken for hung.
HEARTBEAT_TIMEOUT_S = 30.0
# How long shutdown() waits for the engine process to stop before killing it.
STOP_TIMEOUT_S = 30.0


# ---- engine process -----------------------------------------------------------------------------------------
class _Outbox:
    """What the engine process sends the replica: stream items gathered over one engine iteration, then sent
    as one message; heartbeats. Sending is serialized (the engine thread and the main thread both send)."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._items: list[tuple[int, Any]] = []
        self._items_lock = threading.Lock()
        self._send_lock = threading.Lock()

    def put(self, token: int, item: Any) -> None:
        with self._items_lock:
            self._items.append((token, item))

    def flush(self, stats: EngineStats, snapshot: tuple | None, dead: str | None) -> None:
        with self._items_lock:
            items, self._items = self._items, []
        self.send("step", [(token, _picklable(item)) for token, item in items], stats, snapshot, dead)

    def send(self, *message: Any) -> None:
        with self._send_lock:
            self._conn.send(message)


def _picklable(item: Any) -> Any:
    """An item as it can cross the pipe: an exception that does not pickle (a bug's, with odd arguments)
    becomes a RuntimeError with its text; deltas and herd's errors pickle as they are."""
    if isinstance(item, BaseException) and not isinstance(item, HerdError):
        try:
            pickle.dumps(item)
        except Exception:  # noqa: BLE001 - whatever made it unpicklable
            return RuntimeError(f"{type(item).__name__}: {item}")
    return item


class _OutboxStream(_Stream):
    """A stream whose reader is in the replica process: its items go to the outbox under its token."""

    def __init__(self, token: int, request_id: str, pacing: StreamPacing, n: int, outbox: _Outbox):
        super().__init__(request_id, pacing, n)
        self.token = token
        self.outbox = outbox

    def post(self, item: StreamDelta | BaseException) -> None:
        self.outbox.put(self.token, item)


class _EngineCore(AsyncEngine):
    """The engine thread of the engine process: AsyncEngine's loop, flushing the outbox after every iteration
    (with the stats, and the prefix-cache snapshot when it was retaken)."""

    def __init__(self, engine, pacing: StreamPacing, outbox: _Outbox):
        self._outbox = outbox   # before AsyncEngine starts the thread, which flushes it
        super().__init__(engine, pacing)

    def _snapshot(self) -> None:
        taken_at = self._hashes_at
        super()._snapshot()
        snapshot = (self._hashes, self._block_filter) if self._hashes_at != taken_at else None
        self._outbox.flush(self._stats, snapshot, self._dead)


def _engine_info(core: _EngineCore) -> dict[str, Any]:
    engine = core.engine
    return {"max_model_len": engine.max_model_len, "block_size": engine.block_size,
            "vocab_size": engine.vocab_size, "step_timeout_s": engine.config.step_timeout_s,
            "has_tokenizer": engine.tokenizer is not None, "model_config": engine.model_config,
            "max_held": max_held(engine.config),
            "stats": core.stats(), "pid": os.getpid()}


def _serve(commands: Connection, core: _EngineCore, outbox: _Outbox) -> bool:
    """Apply the replica's commands until it says stop (True) or goes away (False); beat in between."""
    from .host_memory import TRIM_PERIOD_S, trim_host_memory

    streams: dict[int, _OutboxStream] = {}
    next_beat = next_trim = 0.0
    while True:
        now = time.monotonic()
        if now >= next_beat:
            outbox.send("beat", core._busy_since, core._dead)
            next_beat = now + HEARTBEAT_PERIOD_S
        if now >= next_trim:  # freed heap pages back to the OS (workers.host_memory); ctypes drops the GIL
            next_trim = now + TRIM_PERIOD_S if trim_host_memory() else float("inf")
        if not commands.poll(max(0.0, next_beat - time.monotonic())):
            continue
        try:
            message = commands.recv()
        except (EOFError, OSError):
            return False
        kind = message[0]
        if kind == "add":
            _, token, request_id, prompt, params, cache_salt, n = message
            streams[token] = stream = _OutboxStream(token, request_id, core.pacing, n, outbox)
            core._submit(stream, prompt, params, cache_salt)
        elif kind == "close":
            _, token, finished = message
            stream = streams.pop(token, None)
            if stream is not None:
                core._withdraw(stream, finished)
        elif kind == "abort":
            core.abort(message[1])
        elif kind == "stop":
            return True
        else:
            log.error("engine process: unknown command %r", kind)


def main(argv: Sequence[str]) -> int:
    """`python -m workers.engine_process COMMANDS_FD EVENTS_FD`: load the engine the first command names,
    then serve the replica's commands."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s [engine process {os.getpid()}]: %(message)s")
    commands = Connection(int(argv[0]), writable=False)
    outbox = _Outbox(Connection(int(argv[1]), readable=False))
    try:
        _, path, pacing, cpu_cores, engine_kwargs = commands.recv()
    except (EOFError, OSError):
        return 1
    try:
        if cpu_cores is not None:  # before torch starts its threads: they inherit the affinity
            from .cpu_affinity import pin_this_process
            log.info("engine process: on CPUs %s", sorted(pin_this_process(cpu_cores)))
        from .engine import Engine
        engine = Engine.from_pretrained(path, **engine_kwargs)
    except BaseException as e:  # noqa: BLE001 - whatever it was, the replica says it; it also lands in the log
        log.exception("engine process: loading %s failed", path)
        outbox.send("failed", _picklable(e) if isinstance(e, Exception) else RuntimeError(repr(e)))
        return 1
    core = _EngineCore(engine, pacing, outbox)
    freeze_startup_objects("engine process")   # (workers.gc_freeze) before the first request, not during one
    outbox.send("ready", _engine_info(core))
    if not _serve(commands, core, outbox):
        # The replica is gone (killed, crashed): nobody reads what we would send, and the OS frees the memory.
        os._exit(0)
    core.shutdown()
    return 0


def single_malloc_arena(env: dict[str, str]) -> dict[str, str]:
    """glibc's one-arena setting for the engine process, unless the environment already sets the arena count.

    The engine's step runs in a thread of its own, and glibc gives each thread an arena of 64 MiB heaps that it
    maps and unmaps as they fill and empty. A step's logits are tens of MiB (rows x 128,256 x 4 bytes) and their
    size follows the batch, so every step mapped fresh pages, and the kernel zeroing them took ~12% of the
    engine process's CPU (perf). With the main arena for every thread, freed memory is reused as it is in a
    single-threaded process: at 64 streams the engine's CPU per request fell from 13.2-13.6 to 10.8-11.1 ms
    (`herd bench load --engine-hop-only --concurrency 64 --requests-per-level 1536`, docs/serving.md). Other C
    libraries ignore the variable."""
    if "MALLOC_ARENA_MAX" in env or "malloc.arena_max" in env.get("GLIBC_TUNABLES", ""):
        return {}
    return {"MALLOC_ARENA_MAX": "1"}


# ---- replica process ----------------------------------------------------------------------------------------
class EngineProcessClient(EngineFront):
    """AsyncEngine's interface (generate, abort, stats, the cache snapshot, check_health, shutdown) over an
    engine in a process of its own (module doc). Construction starts the process and blocks until the model
    has loaded there; a load that fails raises its error here. `cpu_cores` (a cpu list, "2-7"): the CPUs the
    engine process moves onto before it loads (workers.cpu_affinity)."""

    def __init__(self, path: str | Path, *, pacing: StreamPacing | None = None, cpu_cores: str | None = None,
                 **engine_kwargs: Any):
        super().__init__(pacing)
        commands_r, commands_w = os.pipe()
        events_r, events_w = os.pipe()
        env = dict(os.environ)
        # The engine process imports this very copy of herd (a Ray worker finds it through its runtime env, which
        # the child does not read); the same interpreter brings the same site-packages.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.update(single_malloc_arena(env))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "workers.engine_process", str(commands_r), str(events_w)],
                pass_fds=(commands_r, events_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(commands_r)
            os.close(events_w)
        self._commands = Connection(commands_w, readable=False)
        self._events = Connection(events_r, writable=False)
        self._send_lock = threading.Lock()
        self._by_token: dict[int, _CallerStream] = {}
        self._tokens = itertools.count()
        self._stopping = False
        self._send("load", str(path), self.pacing, cpu_cores, engine_kwargs)
        info = self._wait_ready(path)
        self.pid: int = info["pid"]
        self.max_model_len: int = info["max_model_len"]
        self.block_size: int = info["block_size"]
        self.vocab_size: int = info["vocab_size"]
        self.step_timeout_s: float = info["step_timeout_s"]
        self.model_config = info["model_config"]
        self._has_tokenizer: bool = info["has_tokenizer"]
        self._max_held = info["max_held"]
        self._stats: EngineStats = info["stats"]
        self._hashes: list[int] = []
        self._block_filter: dict | None = None
        self._busy_since: float | None = None
        self._heard_at = time.monotonic()
        self._reader = threading.Thread(target=self._read_events, name="herd-engine-events", daemon=True)
        self._reader.start()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, pacing: StreamPacing | None = None,
                        **kwargs: Any) -> "EngineProcessClient":
        return cls(path, pacing=pacing, **kwargs)

    def _wait_ready(self, path) -> dict[str, Any]:
        while not self._events.poll(1.0):
            if self._proc.poll() is not None:
                raise EngineUnavailableError(f"the engine process exited with code {self._proc.returncode} "
                                             f"while loading {path} (its log is the replica's)")
        try:
            kind, payload = self._events.recv()
        except (EOFError, OSError):
            code = self._proc.wait(timeout=STOP_TIMEOUT_S)
            raise EngineUnavailableError(f"the engine process exited with code {code} while loading {path}") from None
        if kind == "failed":
            self._proc.wait(timeout=STOP_TIMEOUT_S)
            raise payload
        return payload

    # ---- caller side ---------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                         has_tokenizer=self._has_tokenizer)

    def _submit(self, stream: _CallerStream, prompt, params: SamplingParams, cache_salt: int) -> None:
        stream.token = token = next(self._tokens)
        self._by_token[token] = stream
        self._send("add", token, stream.request_id, prompt, params, cache_salt, stream.n)

    def _withdraw(self, stream: _CallerStream, finished: bool) -> None:
        token = getattr(stream, "token", None)
        if token is not None and self._by_token.pop(token, None) is not None:
            self._send("close", token, finished)

    def abort(self, request_id: str) -> None:
        """Abort a request by id; its stream (if one is iterating) ends with a final "abort" delta."""
        self._send("abort", request_id)

    def check_health(self) -> None:
        """Raise EngineUnavailableError if the engine cannot serve: its process has exited or stopped
        answering, it failed, or its current step has run past step_timeout_s (every open stream then ends
        at once)."""
        self._raise_if_dead()
        if (code := self._proc.poll()) is not None:
            self._declare_dead(f"the engine process exited with code {code}")
        elif (silent := time.monotonic() - self._heard_at) > HEARTBEAT_TIMEOUT_S:
            self._declare_dead(f"the engine process has not answered for {silent:.0f}s")
        self._raise_if_dead()
        self._check_step_time(self._busy_since, self.step_timeout_s)

    def shutdown(self) -> None:
        """Stop the engine process (it aborts whatever still runs); kill it if it does not stop in time. An
        engine already down is not asked (a frozen one would never read the request): it is terminated."""
        was_down = self._dead is not None
        self._declare_dead("engine shut down", expected=True)
        self._stopping = True
        if not was_down:
            self._send("stop")
        else:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT_S if not was_down else 5)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop in time; killing it")
            self._proc.kill()
            self._proc.wait()
        self._commands.close()

    def _send(self, *message: Any) -> None:
        # Nothing more for an engine that is down (but the stop): a frozen one no longer reads, and a full
        # pipe would block the caller's event loop.
        if self._dead is not None and not (self._stopping and message[0] == "stop"):
            return
        try:
            with self._send_lock:
                self._commands.send(message)
        except (OSError, ValueError):  # the pipe is closed: the engine process is gone (the reader says why)
            if not self._stopping:
                self._declare_dead("the engine process is gone")

    # ---- reader thread -------------------------------------------------------------------------------------
    def _read_events(self) -> None:
        try:
            while True:
                message = self._events.recv()
                self._heard_at = time.monotonic()
                if message[0] == "step":
                    _, items, stats, snapshot, dead = message
                    for token, item in items:
                        stream = self._by_token.get(token)
                        if stream is not None:
                            stream.post(item)
                    self._stats = stats
                    if snapshot is not None:
                        self._hashes, self._block_filter = snapshot
                else:  # "beat"
                    _, self._busy_since, dead = message
                if dead is not None:
                    self._declare_dead(dead)
        except (EOFError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a message we cannot read: the engine cannot be trusted any more
            log.exception("reading the engine process's events failed")
        if not self._stopping:
            try:
                code = self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                code = "killed: it stopped talking"
            self._declare_dead(f"the engine process exited with code {code}")
        self._events.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
