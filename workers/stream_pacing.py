"""How often AsyncEngine hands a stream its new tokens: every step when the engine is quiet, in batches under
load.

Each message a replica streams costs CPU on every hop after the engine (a wake-up of the caller's event loop,
a Ray object from the replica to the ingress and another to the proxy, a gRPC/SSE frame), while the engine
makes one token per stream per step. With dozens of streams those per-message costs, not the model, bound the
throughput: on a 2-core machine the serving path carried ~650 messages/s while the engine alone made ~2,100
tokens/s at 64 streams (`herd bench load`, docs/serving.md). So the engine keeps its total message rate near
`max_messages_per_s`: each stream gets its tokens at most every `active_streams / max_messages_per_s` seconds
(never longer than `max_interval_s`), all that it has by then in one delta. The first token and the last delta
always go at once, so time to first token and the end of a stream are never delayed, and a stream's tokens
are never reordered or dropped. SGLang's `stream_interval` makes the same trade with a fixed token count;
this one adapts to the load.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamPacing:
    # For the whole engine; 0 = every step's tokens at once. 200 rather than 400: at 64 streams on 2 vCPUs the
    # served tok/s rose 15% (2,088 -> 2,398-2,532) and TTFT p50 fell (docs/serving.md, "Streaming under load").
    max_messages_per_s: float = 200.0
    max_interval_s: float = 0.25

    def interval(self, active_streams: int) -> float:
        """Seconds a stream waits between deltas while `active_streams` streams share the engine."""
        if self.max_messages_per_s <= 0:
            return 0.0
        return min(self.max_interval_s, max(0, active_streams) / self.max_messages_per_s)


class PacedDeltas:
    """One stream's tokens not yet handed over: `add` each engine delta, and `take` one merged delta once
    `due(now, active_streams)` says so."""

    def __init__(self, pacing: StreamPacing):
        self.pacing = pacing
        self._pending: list = []   # workers.StreamDelta, merged once when taken
        self.sent_any = False
        self.last_sent = 0.0

    @property
    def holding(self) -> bool:
        return bool(self._pending)

    def add(self, delta) -> None:
        self._pending.append(delta)

    def due(self, now: float, active_streams: int) -> bool:
        if not self._pending:
            return False
        if self._pending[-1].finished or (not self.sent_any and any(d.token_ids for d in self._pending)):
            return True
        return now - self.last_sent >= self.pacing.interval(active_streams)

    def take(self, now: float):
        delta = type(self._pending[0]).merged(self._pending)   # (the engine's StreamDelta: not imported here)
        self._pending = []
        self.sent_any = self.sent_any or bool(delta.token_ids)
        self.last_sent = now
        return delta
