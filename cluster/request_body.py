"""An HTTP request's body as the ingress reads it: bounded in size, in time, and in how many arrive slowly at once.

Serve's HTTP proxy hands a request to an ingress replica as soon as its headers are in; the body follows,
message by message, as the route reads it. Until then the request holds one of the ingress replica's
`max_ongoing_requests` slots (cluster.config: the models' seats, the Health.Watch streams and some headroom for
unary calls share them). A client that sends its headers and then its body a byte at a time (a stuck client, a
slow link, a slowloris attack) would hold that slot for as long as it liked: ~220 such connections to a
one-model cluster (its ingress's slots and queue) left every other call, Health.Check and /health included,
refused with RESOURCE_EXHAUSTED / 503 until they went away.

So the body of every guarded request (cluster.openai_http.EdgeGuard) is read through `GuardedBody`:
- over `limits.max_request_body_bytes` (by Content-Length, or as a chunked body arrives): 413;
- a body still arriving `limits.slow_request_body_s` after the route began to read it is *slow*; at most
  `limits.max_slow_request_bodies` are slow at once per ingress replica (`SlowBodies`), the next is refused
  with 429 and Retry-After, so slow uploads never hold more slots than that once they are that old;
- the whole body must be in within `limits.request_body_timeout_s` of that first read: 408.
  (nginx's `client_body_timeout` bounds the gap between two reads, which a byte a minute defeats; this bounds
  the whole body.)

Why `slow_request_body_s` is 10 s and not a fraction of a second: the ingress cannot tell a slow client from a
busy server. It fetches the body from the proxy with one Ray call per read, and under a burst that call is slow
even when the client sent everything with its headers: a burst of 256 HTTP completions at once to one ingress
on 2 vCPUs waited 1.6 s for its first read at the median, 5.3 s at p99 and 5.9 s at most. With 0.5 s, 223 of
those 256 were refused as slow. The way to tell them apart is to read the body in the proxy before the request
is routed, as nginx and Envoy buffer a request; but the proxy would then read the bodies of unauthenticated
requests too, which EdgeGuard refuses before reading a byte (the proxy does not hold the API keys), so herd does
not. Once complete, reads (which then wait for a disconnect, to cancel a stream) have no deadline.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from cluster.errors import RETRY_AFTER_S, ApiError

# The least time a read is given, however late it is asked for: a message that is there is never refused.
MIN_WAIT_S = 0.01

Receive = Callable[[], Awaitable[dict]]


class BodyRefused(HTTPException):
    """A body refused while it arrives. An HTTPException, so FastAPI's body parsing lets it through to its
    handler (cluster.openai_http) instead of calling it a parse error."""

    def __init__(self, status_code: int, error: ApiError):
        super().__init__(status_code=status_code)
        self.error = error

    def response(self) -> JSONResponse:
        headers = {"retry-after": str(RETRY_AFTER_S)} if self.status_code == 429 else None
        return JSONResponse(self.error.openai_body(), status_code=self.status_code, headers=headers)


def body_too_large(limit: int) -> BodyRefused:
    return BodyRefused(413, ApiError.invalid("body", f"request body is over this server's limit of {limit} bytes "
                                                     "(limits.max_request_body_bytes)"))


def body_too_slow(timeout_s: float) -> BodyRefused:
    return BodyRefused(408, ApiError.invalid("body", f"the request body did not arrive within {timeout_s:g} s "
                                                     "(limits.request_body_timeout_s)"))


def too_many_slow_bodies(cap: int) -> BodyRefused:
    return BodyRefused(429, ApiError("RESOURCE_EXHAUSTED", f"{cap} request bodies are already arriving slowly at "
                                                           "this server (limits.max_slow_request_bodies); send "
                                                           "the body with the request, or retry", "body"))


class SlowBodies:
    """How many bodies are arriving slowly on one ingress replica (its event loop; no lock needed)."""

    def __init__(self):
        self.count = 0


class GuardedBody:
    """One request's ASGI `receive`, with its body bounded. `close()` when the request is over."""

    def __init__(self, receive: Receive, *, max_bytes: int, timeout_s: float, slow_after_s: float, max_slow: int,
                 slow_bodies: SlowBodies, clock: Callable[[], float] = time.monotonic):
        self._receive = receive
        self._max_bytes, self._timeout_s, self._max_slow = max_bytes, timeout_s, max_slow
        self._slow_after_s = slow_after_s
        self._slow_bodies, self._clock = slow_bodies, clock
        self._started: float | None = None   # the route's first read
        self._received = 0
        self._complete = False
        self._counted_slow = False

    async def receive(self) -> dict:
        if self._complete:
            return await self._receive()
        message = await self._next_message()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._max_bytes:
                self.close()
                raise body_too_large(self._max_bytes)
            if not message.get("more_body", False):
                self.close()
        else:  # http.disconnect: there is no more body to wait for
            self.close()
        return message

    async def _next_message(self) -> dict:
        if self._started is None:
            self._started = self._clock()
        pending = asyncio.ensure_future(self._receive())
        try:
            if not self._counted_slow:
                if await self._arrives_within(pending, self._slow_after_s):
                    return pending.result()
                if self._slow_bodies.count >= self._max_slow:
                    raise too_many_slow_bodies(self._max_slow)
                self._slow_bodies.count += 1
                self._counted_slow = True
            if await self._arrives_within(pending, self._timeout_s):
                return pending.result()
            raise body_too_slow(self._timeout_s)
        finally:
            if not pending.done():
                pending.cancel()

    async def _arrives_within(self, pending: asyncio.Future, limit_s: float) -> bool:
        """Whether `pending` completes within `limit_s` of the route's first read (a message already there when
        the time is up still counts: it gets MIN_WAIT_S to be taken)."""
        left = limit_s - (self._clock() - self._started)
        await asyncio.wait({pending}, timeout=max(left, MIN_WAIT_S))
        return pending.done()

    def close(self) -> None:
        """The body is complete or the request is over: stop counting it as slow; later reads are plain."""
        self._complete = True
        if self._counted_slow:
            self._counted_slow = False
            self._slow_bodies.count -= 1
