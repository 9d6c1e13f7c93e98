"""AsyncEngine: the engine core driven by a background thread, for serving.

Callers (a Serve replica's event loop) submit requests and iterate `StreamDelta`s; the engine thread
runs `Engine.step()` whenever there is work, applies submissions and aborts between steps (the core is
single-threaded by design), and hands each delta to the caller's loop with `call_soon_threadsafe`. A caller
that stops iterating (client gone, cancelled) aborts its request, which frees its KV blocks at once.
If a step fails (a shard died), every in-flight request ends with `EngineUnavailableError` and the engine
reports unhealthy from then on.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import torch

from .engine import Engine, EngineStats, StreamDelta
from .errors import EngineUnavailableError, HerdError
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_STOP = object()
# How often the engine thread snapshots its prefix-cache hashes for the router's reports.
HASH_SNAPSHOT_PERIOD_S = 0.5


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.block_size = engine.block_size
        self.vocab_size = engine.vocab_size
        self._commands: queue.SimpleQueue[Callable[[], None] | object] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._dead: BaseException | None = None
        self._stats = engine.stats()
        self._hashes: list[int] = []
        self._hashes_at = 0.0
        self._thread = threading.Thread(target=self._run, name="herd-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "AsyncEngine":
        return cls(Engine.from_pretrained(path, **kwargs))

    # ---- caller side -----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self.engine.validate(prompt_token_ids, params)

    async def generate(self, prompt: str | Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[StreamDelta]:
        self._raise_if_dead()
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        submitted: asyncio.Future = loop.create_future()

        def submit() -> None:
            try:
                rid = self.engine.add_request(prompt, params, request_id)
            except BaseException as e:  # validation / queue-full errors go back to the caller
                loop.call_soon_threadsafe(_set_exception, submitted, e)
                return
            self._streams[rid] = (loop, out)
            loop.call_soon_threadsafe(_set_result, submitted, rid)

        self._send(submit)
        rid = await submitted
        finished = False
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        def do_abort() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)
        self._send(do_abort)

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its latest step (never blocks on a step)."""
        return self._stats

    def cached_block_hashes(self) -> list[int]:
        return list(self._hashes)

    def check_health(self) -> None:
        self._raise_if_dead()
        try:
            self.engine.check_health()
        except HerdError as e:
            raise EngineUnavailableError(str(e)) from e

    def shutdown(self) -> None:
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._wake.set()
            self._thread.join(timeout=30)
        self.engine.shutdown()

    def _send(self, command: Callable[[], None]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineUnavailableError(f"engine is down: {self._dead}")

    # ---- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self.engine.has_unfinished() and self._commands.empty():
                self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._commands.empty():
                command = self._commands.get()
                if command is _STOP:
                    self._fail_all(EngineUnavailableError("engine shut down"))
                    return
                command()
            if self._dead is not None:
                self._fail_all(EngineUnavailableError(f"engine is down: {self._dead}"))
                continue
            try:
                deltas = self.engine.step() if self.engine.has_unfinished() else []
            except Exception as e:  # the executor failed (e.g. a shard died): this engine is done
                log.exception("engine step failed; marking engine unavailable")
                self._dead = e
                self._fail_all(EngineUnavailableError(f"engine is down: {e}"))
                continue
            for d in deltas:
                target = self._streams.get(d.request_id)
                if target is not None:
                    if d.finished:
                        del self._streams[d.request_id]
                    target[0].call_soon_threadsafe(target[1].put_nowait, d)
            self._stats = self.engine.stats()
            now = time.monotonic()
            if now - self._hashes_at >= HASH_SNAPSHOT_PERIOD_S:  # a copy per step would cost O(cache) each step
                self._hashes, self._hashes_at = self.engine.cached_block_hashes(), now

    def _fail_all(self, error: BaseException) -> None:
        for rid, (loop, out) in list(self._streams.items()):
            loop.call_soon_threadsafe(out.put_nowait, error)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - best effort while failing everything
                pass
        self._streams.clear()


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
