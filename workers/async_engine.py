"""AsyncEngine: the engine core driven by a background thread, for serving.

Callers (a Serve replica's event loop) submit requests and iterate `StreamDelta`s; the engine thread
runs `Engine.step()` whenever there is work, applies submissions and aborts between steps (the core is
single-threaded by design), and hands each delta to the caller's loop with `call_soon_threadsafe`.

A request's life is: submitted (a command in the queue) -> queued in the scheduler -> prefilling ->
decoding -> finished. A caller that goes away at any point (cancelled, closed, client gone) aborts it and
frees its KV blocks: the request id is chosen before submitting, the stream's try/finally starts before
the first await, and the abort command queues behind the submission, so even a caller cancelled before
its submission was applied leaves nothing behind.

One request's own failure (sampling its row, detokenizing) ends that request with its typed error
(`RequestFailedError`); the others go on. A failed step (a shard died), a crashed engine thread, or a step
running longer than `EngineConfig.step_timeout_s` (noticed by `check_health`, which Serve calls
periodically) makes the engine unavailable: every open stream ends with `EngineUnavailableError` at once,
from the caller's side if the engine thread is stuck, and later calls fail fast.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import torch

from .engine import Engine, EngineStats, StreamDelta
from .errors import EngineUnavailableError, HerdError, QueueFullError
from .sampling import SamplingParams
from .stream_pacing import PacedDeltas, StreamPacing

log = logging.getLogger(f"herd.{__name__}")

_STOP = object()
# How often the engine thread snapshots its prefix cache for the router's reports: the Bloom filter of every
# cached block (one copy of its bytes) and the most recently used hashes (a bounded list).
HASH_SNAPSHOT_PERIOD_S = 0.5
HASH_SNAPSHOT_LIMIT = 4096


def max_held(config) -> int | None:
    """Requests an engine with this EngineConfig holds at most: max_num_seqs running + max_queued_requests
    waiting (None when its queue is unbounded)."""
    if config.max_queued_requests is None:
        return None
    return config.max_num_seqs + config.max_queued_requests


class _Stream:
    """One request's stream as the engine thread sees it: the request id, each completion's held tokens
    (pacing), and how many completions have finished. `post` hands an item (a StreamDelta, or an exception that
    ends the stream) to whoever reads the stream. A request with n completions has one stream."""

    def __init__(self, request_id: str, pacing: StreamPacing, n: int = 1):
        self.request_id = request_id
        self.n = n
        # Touched by the engine thread only: each completion's held tokens, and how many have finished.
        self.paced = {i: PacedDeltas(pacing) for i in range(n)}
        self.num_finished = 0

    def post_held(self, now: float) -> None:
        """Hand over every completion's held tokens."""
        for paced in self.paced.values():
            if paced.holding:
                self.post(paced.take(now))

    def post(self, item: StreamDelta | BaseException) -> None:
        raise NotImplementedError


class _CallerStream(_Stream):
    """A stream read by a caller's event loop (`EngineFront.generate`): items go to its queue."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, pacing: StreamPacing, n: int = 1):
        super().__init__(request_id, pacing, n)
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def post(self, item: StreamDelta | BaseException) -> None:
        """Hand `item` to the caller (from any thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


class EngineFront:
    """The caller's side of an engine that runs elsewhere (a thread: AsyncEngine; a process:
    workers.engine_process.EngineProcessClient): `generate` streams, open-stream bookkeeping, and the engine's
    death, which ends every open stream at once. Subclasses submit and withdraw a stream (`_submit`,
    `_withdraw`) and say whether the engine still runs (`check_health`)."""

    def __init__(self, pacing: StreamPacing | None):
        # No pacing unless asked (every step's tokens at once); the serving layer passes its configured one.
        self.pacing = pacing or StreamPacing(max_messages_per_s=0)
        # Every caller's open stream, from the moment generate() starts; guarded by _lock, because a caller
        # (check_health, shutdown) must be able to end them all while the engine is stuck in a step.
        self._lock = threading.Lock()
        self._open: set[_CallerStream] = set()
        self._dead: str | None = None          # why the engine is unavailable; set once, under _lock
        # Requests the engine holds at most (max_num_seqs running + max_queued_requests waiting; None: no bound),
        # set by the subclass: a caller past it is refused here, without a round trip to the engine (below).
        self._max_held: int | None = None

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None, *, cache_salt: int = 0) -> AsyncIterator[StreamDelta]:
        """Stream the request's deltas: with params.n > 1, those of all n completions (StreamDelta.index),
        ending when all n are finished. Raises the engine's typed errors: InvalidRequestError /
        QueueFullError when it is refused (or its grammar does not compile), RequestFailedError when it
        alone failed, EngineUnavailableError when the engine is down. Closing or cancelling the iteration at
        any point aborts the request (all its completions)."""
        n = params.n if isinstance(params, SamplingParams) else 1
        stream = _CallerStream(request_id or f"req-{uuid.uuid4().hex}", asyncio.get_running_loop(), self.pacing, n)
        self._open_stream(stream)
        finished = False
        try:
            self._submit(stream, prompt, params, cache_salt)
            held = None
            num_finished = 0
            while True:
                item, held = (held, None) if held is not None else (await stream.queue.get(), None)
                if isinstance(item, BaseException):  # refused, or the engine went down
                    raise item
                if item.error is not None:           # failed alone; the engine already dropped it
                    finished = True
                    raise item.error
                # Deltas that piled up while the caller was busy go out as one: under load each hop after
                # this one (Serve, the ingress, gRPC) then moves fewer, larger messages. Only deltas of the
                # same completion merge; the first other one waits for the next round.
                batch = [item]
                while not batch[-1].finished and not stream.queue.empty():
                    later = stream.queue.get_nowait()
                    if isinstance(later, BaseException) or later.error is not None or later.index != item.index:
                        held = later
                        break
                    batch.append(later)
                item = StreamDelta.merged(batch)
                yield item
                if item.finished:
                    num_finished += 1
                    if num_finished >= stream.n:
                        finished = True
                        return
        finally:
            self._close_stream(stream)
            self._withdraw(stream, finished)

    # The engine's latest snapshots (subclasses keep _stats, _hashes and _block_filter current): reading them
    # never waits for a step.
    def stats(self) -> EngineStats:
        """The engine's counters after its latest step."""
        return self._stats

    def cached_block_hashes(self) -> list[int]:
        """The most recently used cached block hashes, most recent first (at most HASH_SNAPSHOT_LIMIT)."""
        return list(self._hashes)

    def cached_block_filter(self) -> dict | None:
        """Bloom filter of every cached block hash (KVCacheManager.block_filter), as of the last snapshot."""
        return self._block_filter

    def _submit(self, stream: _CallerStream, prompt, params: SamplingParams, cache_salt: int) -> None:
        """Hand the request to the engine; its deltas (or the error refusing it) come to stream.post."""
        raise NotImplementedError

    def _withdraw(self, stream: _CallerStream, finished: bool) -> None:
        """The caller is done with the stream; unless `finished`, the engine aborts the request wherever it is
        (queued behind the submission, so it finds it)."""
        raise NotImplementedError

    def _open_stream(self, stream: _CallerStream) -> None:
        """Count the stream in, or refuse it: the engine is down, or as many requests as it can hold (running
        and queued) are already open here. That refusal is the engine's own QueueFullError, given at once: the
        engine would refuse it too (every open request is in it or queued before it), only after its current
        step. A request that finished in the engine but whose caller has not closed yet still counts: a
        refusal a few milliseconds early, at the edge of capacity, is the price of not waiting a step."""
        with self._lock:
            if self._dead is None:
                if self._max_held is not None and len(self._open) >= self._max_held:
                    raise QueueFullError(f"{len(self._open)} requests already in this engine (max_num_seqs + "
                                         f"max_queued_requests = {self._max_held})")
                self._open.add(stream)
                return
        self._raise_if_dead()

    def _close_stream(self, stream: _CallerStream) -> None:
        with self._lock:
            self._open.discard(stream)

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineUnavailableError(f"engine is down: {self._dead}")

    def _declare_dead(self, reason: str, *, expected: bool = False) -> None:
        """Mark the engine unavailable (the first reason sticks) and end every open stream. Callable from
        any thread; the engine frees the requests' blocks when (if) it gets back to its loop. `expected`: a
        shutdown, not a failure (logged as such)."""
        with self._lock:
            if self._dead is None:
                log.log(logging.INFO if expected else logging.ERROR, "engine unavailable: %s", reason)
                self._dead = reason
            streams, self._open = list(self._open), set()
        for stream in streams:
            stream.post(EngineUnavailableError(f"engine is down: {self._dead}"))

    def _check_step_time(self, busy_since: float | None, step_timeout_s: float) -> None:
        """Declare the engine dead (and raise) if its current step began more than step_timeout_s ago."""
        if busy_since is not None and (elapsed := time.monotonic() - busy_since) > step_timeout_s:
            self._declare_dead(f"an engine step has run for {elapsed:.1f}s (step_timeout_s={step_timeout_s})")
            self._raise_if_dead()


class AsyncEngine(EngineFront):
    """The engine core driven by a thread of this process (module doc)."""

    def __init__(self, engine: Engine, pacing: StreamPacing | None = None):
        super().__init__(pacing)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.block_size = engine.block_size
        self.vocab_size = engine.vocab_size
        self.step_timeout_s = engine.config.step_timeout_s
        self._max_held = max_held(engine.config)
        self._commands: queue.SimpleQueue[Callable[[], None] | object] = queue.SimpleQueue()
        self._wake = threading.Event()
        # Admitted requests by id; touched by the engine thread only (it routes deltas and applies aborts).
        self._streams: dict[str, _Stream] = {}
        self._busy_since: float | None = None  # when the engine thread's current iteration began; None: idle
        self._stats = engine.stats()
        self._hashes: list[int] = []
        self._block_filter: dict | None = None
        self._hashes_at = 0.0
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, pacing: StreamPacing | None = None, **kwargs) -> "AsyncEngine":
        return cls(Engine.from_pretrained(path, **kwargs), pacing)

    # ---- caller side -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    def _submit(self, stream: _CallerStream, prompt, params: SamplingParams, cache_salt: int) -> None:
        self._send(functools.partial(self._admit, stream, prompt, params, cache_salt))

    def _withdraw(self, stream: _CallerStream, finished: bool) -> None:
        if not finished:
            self._send(functools.partial(self._abort_stream, stream))

    def abort(self, request_id: str) -> None:
        """Abort a request by id; its stream (if one is iterating) ends with a final "abort" delta."""
        def do_abort() -> None:
            stream = self._streams.pop(request_id, None)
            finals = self.engine.abort_request(request_id)
            if stream is not None:
                for final in finals:
                    stream.paced[final.index].add(final)  # with any tokens still held for it
                stream.post_held(time.monotonic())
        self._send(do_abort)

    def check_health(self) -> None:
        """Raise EngineUnavailableError if the engine cannot serve: it failed, its thread is gone, or its
        current step has run past step_timeout_s (then every open stream is ended now, without waiting for
        the stuck step)."""
        self._raise_if_dead()
        if not self._thread.is_alive():
            self._declare_dead("the engine thread has exited")
            self._raise_if_dead()
        self._check_step_time(self._busy_since, self.step_timeout_s)
        try:
            self.engine.check_health()
        except HerdError as e:
            raise EngineUnavailableError(str(e)) from e

    def shutdown(self) -> None:
        self._declare_dead("engine shut down", expected=True)  # open streams end now; later calls fail fast
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._wake.set()
            self._thread.join(timeout=30)
        self.engine.shutdown()

    def _send(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self._loop()
        except BaseException as e:  # a bug in the loop itself: the engine cannot go on
            log.exception("engine thread crashed")
            self._declare_dead(f"engine thread crashed ({type(e).__name__})")
        finally:
            self._busy_since = None

    def _loop(self) -> None:
        while True:
            self._busy_since = None
            if not self.engine.has_unfinished() and self._commands.empty():
                self._wake.wait(timeout=1.0)
            self._wake.clear()
            self._busy_since = time.monotonic()
            while not self._commands.empty():
                command = self._commands.get()
                if command is _STOP:
                    self._abort_everything()
                    return
                command()
            if self._dead is None:
                self._step()
            if self._dead is not None:  # declared by a failed step, or by check_health while it ran
                self._abort_everything()
            self._snapshot()

    def _step(self) -> None:
        if not self.engine.has_unfinished():
            return
        try:
            deltas = self.engine.step()
        except Exception as e:  # the executor failed (e.g. a shard died): this engine is done
            log.exception("engine step failed; marking engine unavailable")
            self._declare_dead(str(e) or type(e).__name__)
            return
        now, active = time.monotonic(), len(self.engine.scheduler.running)
        for d in deltas:
            stream = self._streams.get(d.request_id)
            if stream is None:
                continue
            if d.error is not None:  # what it held, then its error (a failed delta does not merge); all done
                stream.post_held(now)
                stream.post(d)
                del self._streams[d.request_id]
                continue
            paced = stream.paced[d.index]
            paced.add(d)
            if d.finished:
                stream.post(paced.take(now))
                stream.num_finished += 1
                if stream.num_finished >= stream.n:
                    del self._streams[d.request_id]
        # Every stream whose turn has come gets what it holds (also one that made nothing this step, e.g.
        # preempted: its held tokens do not wait for its next one).
        for stream in self._streams.values():
            for paced in stream.paced.values():
                if paced.due(now, active):
                    stream.post(paced.take(now))

    def _admit(self, stream: _Stream, prompt, params: SamplingParams, cache_salt: int) -> None:
        if self._dead is not None:
            stream.post(EngineUnavailableError(f"engine is down: {self._dead}"))
            return
        try:
            self.engine.add_request(prompt, params, stream.request_id, cache_salt=cache_salt)
        except Exception as e:  # validation, queue full, a duplicate id: back to this caller only
            stream.post(e)
            return
        self._streams[stream.request_id] = stream

    def _abort_stream(self, stream: _Stream) -> None:
        # Only this stream's own request: not a refused duplicate's live namesake, nor a later reuse of the id.
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]
            self.engine.abort(stream.request_id)

    def _abort_everything(self) -> None:
        """The engine is going away: free every request's blocks and end every admitted stream."""
        for rid in self.engine.request_ids():
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - best effort while failing everything
                log.exception("aborting %s failed", rid)
        streams, self._streams = self._streams, {}
        reason = self._dead or "engine shut down"
        for stream in streams.values():
            stream.post(EngineUnavailableError(f"engine is down: {reason}"))

    def _snapshot(self) -> None:
        self._stats = self.engine.stats()
        now = time.monotonic()
        if now - self._hashes_at >= HASH_SNAPSHOT_PERIOD_S:  # a copy per step would cost O(cache) each step
            kv = self.engine.kv
            self._hashes, self._block_filter = kv.cached_block_hashes(HASH_SNAPSHOT_LIMIT), kv.block_filter()
            self._hashes_at = now
