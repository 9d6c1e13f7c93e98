"""Serve's HTTP proxy holds a bounded number of connections, none that sends no request for ever, and no
unbounded request head.

Serve's HTTP proxy is uvicorn (Ray 2.60, http_util.start_asgi_http_server). uvicorn closes a connection that
stays idle `keep_alive_timeout_s` (Serve's default: 90 s) after a response, but it arms that timer only after a
response: a connection that never sends a request, or sends part of its request line and headers and then
nothing, stays open for ever, and uvicorn has no cap on connections. Measured on a local herd serve: ~20,000
TCP connections that sent nothing (unauthenticated, no request, so nothing else refuses them) took every file
descriptor of the proxy process (its limit was 20,000); the HTTP proxy then closed every new connection and the
gRPC proxy, which runs in the same process, stopped answering (Health.Check deadline exceeded), until the
client let go. And uvicorn's httptools parser (what it picks when httptools is installed, as it is here) keeps
a header line that never ends, whatever its size: one connection sending an endless header grew the process by
a MiB per MiB sent (60 MiB in 8 s, and on), so a few hundred of them could run the proxy out of memory.
(uvicorn's h11 parser stops at 16 KiB by itself, with a 400.)

`install_http_connection_limits`, run in each proxy process, bounds all three:
- a connection with no request in flight (new, idle after a response, or with a request head still
  arriving) is closed `keep_alive_timeout_s` after it became so: uvicorn's own rule, applied from the start;
- at most `HERD_HTTP_MAX_CONNECTIONS` connections are open (default 10,000, and never more than two fifths of
  the process's file-descriptor limit, which the gRPC proxy and Ray's own sockets share): a connection that opens
  at the cap closes the one that has had no request in flight the longest, and is itself closed when every
  other connection has a request in flight. A request in flight is never cut (its body's pace is
  cluster.request_body's bound), and a new client that sends its request at once is the last one eviction
  would reach;
- a request line and headers (the head) over `HERD_HTTP_MAX_HEADER_BYTES` (default 64 KiB) are answered 431
  and the connection is closed.
They are `limits.max_http_connections` and `limits.max_http_header_bytes` of the cluster config; a local herd
serve sets the variables for its Ray (cluster.local_ray), the Helm chart on every Ray container.

    grpc_servicer_functions: [..., "cluster.proxy_http_connections.install_http_connection_limits"]

uvicorn offers no hook for this; the installer wraps its HTTP protocol classes' `connection_made`,
`data_received`, `on_response_complete` and `connection_lost` (h11 and httptools, whichever uvicorn picks). A
connection upgraded to a WebSocket leaves uvicorn's HTTP connections and is never touched.

Runs in Serve's proxy process: keep the imports light.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections import OrderedDict
from typing import Any, Callable, Optional

MAX_CONNECTIONS_ENV = "HERD_HTTP_MAX_CONNECTIONS"
DEFAULT_MAX_CONNECTIONS = 10_000
MAX_HEAD_BYTES_ENV = "HERD_HTTP_MAX_HEADER_BYTES"
DEFAULT_MAX_HEAD_BYTES = 64 << 10
HEAD_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
# Of the proxy process's open-file limit, what each proxy's connections may take (HTTP and gRPC: 80% together).
OPEN_FILES_SHARE = 0.4
# How often connections idle past their keep-alive are looked for.
SWEEP_PERIOD_S = 1.0
# At most one log line a minute says how many connections the limits closed.
REPORT_PERIOD_S = 60.0

logger = logging.getLogger(f"herd.{__name__}")


def _busy(protocol) -> bool:
    """Has this uvicorn HTTP protocol a request in flight (its head read, its response not complete)?"""
    cycle = getattr(protocol, "cycle", None)
    return (cycle is not None and not cycle.response_complete) or bool(getattr(protocol, "pipeline", None))


def _open(protocol) -> bool:
    """Is it still one of its server's HTTP connections (not closed by anyone, not upgraded to a WebSocket)?"""
    return protocol in protocol.connections and not protocol.transport.is_closing()


class ConnectionLimits:
    """The HTTP connections of one proxy process that have no request in flight, the longest idle first.

    A connection enters when it opens and when a response of its completes, and leaves when it closes. One that
    starts a request stays in the order until it is next looked at (eviction, sweep), which then skips it: it
    enters again, at the end, when its response completes."""

    def __init__(self, max_connections: int, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
                 clock: Callable[[], float] = time.monotonic):
        self.max_connections = max_connections
        self.max_head_bytes = max_head_bytes
        self._clock = clock
        self._idle: OrderedDict[Any, float] = OrderedDict()
        self.evicted = 0       # idle connections closed to make room for a new one
        self.refused = 0       # new connections closed: every other one had a request in flight
        self.expired = 0       # connections closed after keep_alive_timeout_s with no request in flight
        self.oversized = 0     # request heads refused (431) past max_head_bytes
        self._reported = (0, 0, 0, 0)
        self._reported_at = clock()

    def idle(self, protocol) -> None:
        self._idle[protocol] = self._clock()
        self._idle.move_to_end(protocol)
        protocol.herd_head_bytes = 0

    def head_within_bound(self, protocol, received: int) -> bool:
        """`received` bytes were just parsed on this connection. While its request head is incomplete (no
        request in flight) they count against max_head_bytes; False past it."""
        if _busy(protocol):
            protocol.herd_head_bytes = 0
            return True
        protocol.herd_head_bytes = getattr(protocol, "herd_head_bytes", 0) + received
        if protocol.herd_head_bytes <= self.max_head_bytes:
            return True
        self.oversized += 1
        return False

    def closed(self, protocol) -> None:
        self._idle.pop(protocol, None)

    def admit(self, protocol) -> bool:
        """A connection opened (it is in its server's `connections` already). Closes the longest idle others
        while the server holds more than the cap; False when none was idle: the caller closes this one."""
        self.idle(protocol)
        connections = protocol.connections
        while len(connections) > self.max_connections:
            victim = self._longest_idle(besides=protocol)
            if victim is None:
                self._idle.pop(protocol, None)
                self.refused += 1
                return False
            _close(victim)
            self.evicted += 1
        return True

    def sweep(self) -> None:
        """Close the connections that have had no request in flight for their keep-alive timeout."""
        now = self._clock()
        while self._idle:
            protocol, since = next(iter(self._idle.items()))
            if now - since < protocol.timeout_keep_alive:
                break
            del self._idle[protocol]
            if _open(protocol) and not _busy(protocol):
                _close(protocol)
                self.expired += 1
        self._report(now)

    def _longest_idle(self, besides) -> Optional[Any]:
        """Take the longest idle connection but `besides` (the newcomer, which admit just put last) out of the
        order, dropping the ones found busy or closed on the way: each is looked at once, not the whole order."""
        while self._idle:
            protocol = next(iter(self._idle))
            if protocol is besides:
                return None
            del self._idle[protocol]
            if _open(protocol) and not _busy(protocol):
                return protocol
        return None

    def _report(self, now: float) -> None:
        counts = (self.evicted, self.refused, self.expired, self.oversized)
        if counts == self._reported or now - self._reported_at < REPORT_PERIOD_S:
            return
        evicted, refused, expired, oversized = (c - r for c, r in zip(counts, self._reported))
        logger.warning("herd: HTTP connection limits closed %d idle connection(s) at the cap of %d, %d new one(s) "
                       "with every other busy, %d idle past keep-alive, and %d whose request head was over %d "
                       "bytes, in the last %.0f s", evicted, self.max_connections, refused, expired, oversized,
                       self.max_head_bytes, now - self._reported_at)
        self._reported, self._reported_at = counts, now


def max_connections_from_env(environ=os.environ) -> int:
    """The cap: HERD_HTTP_MAX_CONNECTIONS (default 10,000), at most OPEN_FILES_SHARE of the open-file limit."""
    return within_open_files(int(environ.get(MAX_CONNECTIONS_ENV) or DEFAULT_MAX_CONNECTIONS), MAX_CONNECTIONS_ENV)


def limits_from_env(environ=os.environ) -> ConnectionLimits:
    """The limits of this proxy process: the cap, and HERD_HTTP_MAX_HEADER_BYTES (default 64 KiB)."""
    return ConnectionLimits(max_connections_from_env(environ),
                            int(environ.get(MAX_HEAD_BYTES_ENV) or DEFAULT_MAX_HEAD_BYTES))


def within_open_files(configured: int, name: str) -> int:
    """`configured` connections, or OPEN_FILES_SHARE of this process's open-file limit if that is less: the
    HTTP and the gRPC proxy (cluster.grpc_proxy_connections) share the process with each other and with Ray's
    own sockets, so neither cap may let one of them take every descriptor."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or configured <= int(soft * OPEN_FILES_SHARE):
        return configured
    bounded = max(1, int(soft * OPEN_FILES_SHARE))
    logger.info("herd: %s=%d is over %d%% of this process's open-file limit (%d): the proxy holds at most %d "
                "connections", name, configured, round(OPEN_FILES_SHARE * 100), soft, bounded)
    return bounded


def _close(protocol) -> None:
    # Out of the server's count now: its connection_lost comes on a later turn of the loop.
    protocol.connections.discard(protocol)
    protocol.transport.close()


_limits: Optional[ConnectionLimits] = None


def install_http_connection_limits(servicer=None, server=None, limits: Optional[ConnectionLimits] = None) -> None:
    """A gRPC servicer function that adds no service: this process's uvicorn HTTP servers hold connections as the
    module doc says. Serve calls it with its mock servicer and its gRPC server; tests pass their own `limits`."""
    global _limits
    _limits = limits or limits_from_env()
    for protocol_class in _protocol_classes():
        if not getattr(protocol_class.connection_made, "herd_connection_limits", False):
            _wrap(protocol_class)


def _protocol_classes() -> list[type]:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    classes = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional: uvicorn then speaks h11 only
        return classes
    return classes + [HttpToolsProtocol]


_sweepers: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}


def _sweep_on(loop: asyncio.AbstractEventLoop) -> None:
    """Sweep every SWEEP_PERIOD_S on this loop (the proxy's), from the first connection on."""
    if loop in _sweepers:
        return

    def tick():
        if _limits is not None:
            _limits.sweep()
        _sweepers[loop] = loop.call_later(SWEEP_PERIOD_S, tick)

    _sweepers[loop] = loop.call_later(SWEEP_PERIOD_S, tick)


def _wrap(protocol_class: type) -> None:
    connection_made = protocol_class.connection_made
    on_response_complete = protocol_class.on_response_complete
    connection_lost = protocol_class.connection_lost
    data_received = protocol_class.data_received

    def limited_connection_made(self, transport):
        connection_made(self, transport)
        _sweep_on(self.loop)
        if _limits is not None and not _limits.admit(self):
            _close(self)

    def limited_on_response_complete(self):
        on_response_complete(self)
        if _limits is not None and not self.transport.is_closing():
            _limits.idle(self)

    def limited_data_received(self, data):
        data_received(self, data)
        if _limits is not None and not self.transport.is_closing() and not _limits.head_within_bound(self, len(data)):
            _refuse_head(self, _limits.max_head_bytes)

    def limited_connection_lost(self, exc):
        if _limits is not None:
            _limits.closed(self)
        connection_lost(self, exc)

    limited_connection_made.herd_connection_limits = True
    protocol_class.connection_made = limited_connection_made
    protocol_class.on_response_complete = limited_on_response_complete
    protocol_class.connection_lost = limited_connection_lost
    protocol_class.data_received = limited_data_received


def _refuse_head(protocol, max_head_bytes: int) -> None:
    """Answer 431 and close: the request head is still arriving past max_head_bytes."""
    message = f"the request line and headers are over {max_head_bytes} bytes".encode()
    protocol.transport.write(HEAD_TOO_LARGE + b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                             + b"content-length: " + str(len(message)).encode() + b"\r\n\r\n" + message)
    _close(protocol)
