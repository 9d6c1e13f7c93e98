"""The request a piece of code is working for: its id in every log line, carried from the ingress to the replica.

    REQUEST_ID_HEADER                          # "x-request-id": HTTP header, gRPC metadata key
    grpc_request_id(field, metadata)           # the client's id (the proto field, else metadata), or None
    with request_scope(request_id): ...        # at the ingress: this task works for that request
    outgoing_context() -> dict | None          # what travels with the model call (`context=` keyword)
    with request_scope_from(context): ...      # at the model replica
    install_request_id_logging()               # every log line written meanwhile names the request

The id lives in a contextvar, so it follows the request through awaits, `asyncio.to_thread` and the tasks a
request starts, and never leaks into another request's task. It crosses the Serve handle call as plain data
(the `context` keyword of `generate_stream`, cluster.deployment), with the trace context when tracing is on
(cluster.tracing), because a contextvar does not travel between processes.

Log lines: `RequestIdFilter` on the handlers of the `ray.serve` logger (Serve's replica log files and
stderr) and of the root logger prefixes each message written while a request id is set with
`[request_id=<id>] `. A filter on a *handler* sees every record that reaches it, from herd's module loggers
(propagated) and from Serve's own, unlike a logger filter, which sees only its own logger's records.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Any, Iterable, Iterator, Mapping, Optional

REQUEST_ID_HEADER = "x-request-id"
# Serve's own gRPC metadata key for a request id (its proxy echoes it in trailing metadata).
SERVE_REQUEST_ID_METADATA = "request_id"

REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("herd_request_id", default=None)


def current_request_id() -> Optional[str]:
    return REQUEST_ID.get()


def grpc_request_id(field_value: str, metadata: Iterable[tuple[str, Any]]) -> Optional[str]:
    """The id a gRPC client chose: the request message's `request_id` field, else the `x-request-id`
    metadata, else Serve's `request_id` metadata; None when it sent none."""
    if field_value:
        return field_value
    found = {}
    for key, value in metadata or ():
        if isinstance(value, str) and value:
            found.setdefault(key.lower(), value)
    return found.get(REQUEST_ID_HEADER) or found.get(SERVE_REQUEST_ID_METADATA)


def http_request_id(headers: Iterable[tuple[str, str]]) -> Optional[str]:
    """The request's `X-Request-Id` (Serve's HTTP proxy sets one, a fresh uuid, when the client sent none)."""
    for key, value in headers:
        if key.lower() == REQUEST_ID_HEADER and value:
            return value
    return None


@contextlib.contextmanager
def request_scope(request_id: Optional[str]) -> Iterator[Optional[str]]:
    """Work inside the block is done for `request_id` (its log lines name it)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield request_id
    finally:
        try:
            REQUEST_ID.reset(token)
        except ValueError:  # an async generator closed from another task's context: that context keeps it
            pass


def set_request_id(request_id: Optional[str]) -> None:
    """Set the id for the rest of the current task (a Serve request's own task: it ends with the request).
    For code that cannot wrap the request in `request_scope`, e.g. an async generator that Serve may close
    from another context."""
    REQUEST_ID.set(request_id)


def outgoing_context() -> Optional[dict[str, str]]:
    """The request's context as plain data for a call to another process (None when there is none): its id
    and, with tracing on, the W3C trace context of the current span."""
    ctx: dict[str, str] = {}
    rid = REQUEST_ID.get()
    if rid:
        ctx["request_id"] = rid
    from cluster import tracing  # imports no OpenTelemetry unless tracing is on

    tracing.inject(ctx)
    return ctx or None


def request_id_from(context: Optional[Mapping[str, Any]]) -> Optional[str]:
    value = (context or {}).get("request_id")
    return value if isinstance(value, str) and value else None


class RequestIdFilter(logging.Filter):
    """Prefixes a record's message with the current request id (once per record, whichever handler sees it
    first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        if rid and not getattr(record, "herd_request_id", None):
            record.herd_request_id = rid
            record.msg = f"[request_id={rid}] {record.msg}"
        return True


_FILTER = RequestIdFilter()


def install_request_id_logging(logger_names: Iterable[str] = ("ray.serve", "")) -> None:
    """Add the RequestIdFilter to every handler of these loggers ("" = root), once each. Call it in a replica's
    constructor: Serve has set up its log handlers by then."""
    for name in logger_names:
        for handler in logging.getLogger(name or None).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
