"""OpenTelemetry tracing of requests (optional, off by default): one trace per request, ingress -> router ->
replica -> engine, continuing the `traceparent` a client sends.

Configured by the cluster config's `tracing:` section (cluster.config.TracingConfig), which the ingress and
each model replica pass to `configure(settings, component)` in their constructors:

    tracing:
      enabled: true
      otlp_endpoint: http://otel-collector:4317    # OTLP over gRPC (or http://...:4318/v1/traces with protocol: http)
      protocol: grpc
      service_name: herd
      sample_ratio: 1.0                            # for traces herd starts; a client's sampled flag is kept

Spans (kind, where):
- `herd.ingress <method>` (SERVER, ingress): the whole request as the ingress handles it; its parent is the
  client's `traceparent` (gRPC metadata or HTTP header) when there is one. Attributes: herd.request_id.
- `herd.router` (INTERNAL, the ingress's router for the model): from the first routing attempt to the
  replica taking the request; herd.route.reason (affinity / load / fallback), herd.route.prompt_blocks,
  herd.route.matched_blocks, herd.replica.
- `herd.replica.generate` (SERVER, model replica), with child spans from the timestamps the replica sees
  of its engine stream: `herd.engine.queue` (submitted to the engine -> the engine first scheduled it, as the
  engine reports on its first delta), `herd.engine.prefill` (-> first token) and `herd.engine.decode` (first
  token -> last). A request that never left the queue has a prefill span from submission that says so
  (herd.engine.includes_queue_wait).
- The trace context crosses processes as W3C `traceparent` / `tracestate` strings inside the request's
  context dict (cluster.request_context.outgoing_context), the `context` keyword of the model call.

When tracing is off (the default) nothing here imports OpenTelemetry's SDK or exporters, and every function
is a cheap no-op (`start_*` return None, and the others accept None).

herd keeps its own TracerProvider (it does not replace a process-global one), so it coexists with Ray
Serve's experimental tracing or an application's own provider.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterable, Mapping, Optional

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_lock = threading.Lock()
_tracer = None            # an opentelemetry Tracer once configure() enabled tracing in this process
_provider = None


def enabled() -> bool:
    return _tracer is not None


def configure(settings: Optional[Mapping[str, Any]], component: str, *, span_exporter: Any = None) -> bool:
    """Turn tracing on in this process if `settings` (the config's tracing section, as a dict) enable it.
    Once per process (later calls keep the first set-up). `span_exporter`: an OpenTelemetry SpanExporter to
    use instead of OTLP (e.g. the SDK's InMemorySpanExporter in tests). Returns whether tracing is on."""
    global _tracer, _provider
    if not settings or not settings.get("enabled"):
        return enabled()
    with _lock:
        if _tracer is not None:
            return True
        try:
            import opentelemetry.sdk  # noqa: F401
        except ImportError:
            from cluster.config import ConfigError

            raise ConfigError("tracing.enabled needs OpenTelemetry's SDK and OTLP exporter: "
                              "pip install 'herd[tracing]'") from None
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({"service.name": settings.get("service_name") or "herd",
                                    "herd.component": component})
        provider = TracerProvider(resource=resource,
                                  sampler=ParentBased(TraceIdRatioBased(float(settings.get("sample_ratio", 1.0)))))
        if span_exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
        _provider, _tracer = provider, provider.get_tracer("herd")
    return True


def _otlp_exporter(settings: Mapping[str, Any]):
    endpoint = settings.get("otlp_endpoint")
    headers = dict(settings.get("headers") or {}) or None
    if settings.get("protocol", "grpc") == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter(endpoint=endpoint, headers=headers)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint, insecure=bool(settings.get("insecure", True)), headers=headers)


def shutdown() -> None:
    """Flush and stop this process's tracing (spans still queued are exported first)."""
    global _tracer, _provider
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _tracer, _provider = None, None


# ---- trace context across processes -----------------------------------------------------------------------
def _carrier(headers: Any) -> dict[str, str]:
    """traceparent / tracestate from a dict, or from gRPC metadata / HTTP headers as (key, value) pairs."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or ())
    out = {}
    for key, value in items:
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        key = key.lower()
        if key in (TRACEPARENT, TRACESTATE) and isinstance(value, str):
            out[key] = value
    return out


def extract(headers: Any):
    """The OpenTelemetry context of a remote parent in `headers` (None when tracing is off or none was sent)."""
    if _tracer is None:
        return None
    carrier = _carrier(headers)
    if TRACEPARENT not in carrier:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


def inject(carrier: dict, span: Any = None) -> None:
    """Write the trace context of `span` (default: the current span) into `carrier` (no-op when off)."""
    if _tracer is None:
        return
    from opentelemetry.trace import set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = set_span_in_context(span) if span is not None else None
    TraceContextTextMapPropagator().inject(carrier, context=ctx)


# ---- spans -----------------------------------------------------------------------------------------------------
def _kind(name: str):
    from opentelemetry.trace import SpanKind

    return {"server": SpanKind.SERVER, "internal": SpanKind.INTERNAL, "client": SpanKind.CLIENT}[name]


def start_span(name: str, parent: Any = None, attributes: Optional[Mapping[str, Any]] = None, *,
               kind: str = "internal", start_ns: Optional[int] = None, make_current: bool = False):
    """A new span (None when tracing is off). `parent`: a span, or headers / a context dict carrying a
    traceparent, or None (the current span, if any). `make_current`: the span becomes the current span of
    this task's context for the rest of it (a Serve request's task ends with the request, so nothing needs
    to be restored; async generators cannot reliably restore a context on close anyway)."""
    if _tracer is None:
        return None
    from opentelemetry import context as otel_context
    from opentelemetry.trace import Span, set_span_in_context

    if isinstance(parent, Span):
        ctx = set_span_in_context(parent)
    elif parent is not None:
        ctx = extract(parent)
    else:
        ctx = None
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    span = _tracer.start_span(name, context=ctx, kind=_kind(kind), attributes=attrs, start_time=start_ns)
    if make_current:
        otel_context.attach(set_span_in_context(span))
    return span


def start_request_span(name: str, headers: Iterable[tuple[str, Any]] | Mapping[str, Any]):
    """The ingress span of a request: continues the client's traceparent and becomes the current span, so
    `inject` (cluster.request_context.outgoing_context) hands it to the model call."""
    return start_span(f"herd.ingress {name}", parent=headers, kind="server", make_current=True)


def set_attribute(span: Any, key: str, value: Any) -> None:
    if span is not None and value is not None:
        span.set_attribute(key, value)


def end_span(span: Any, *, error: Optional[str] = None, end_ns: Optional[int] = None) -> None:
    """End `span`; `error` (e.g. a gRPC status code name) marks it failed."""
    if span is None:
        return
    if error:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
        span.set_attribute("herd.error", error)
    span.end(end_time=end_ns)


def grpc_error(code: Any) -> Optional[str]:
    """The status code name of a gRPC status that is an error (None for OK / unset)."""
    name = getattr(code, "name", None) or (str(code) if code else None)
    return None if name in (None, "OK") else name


# ---- engine timings ----------------------------------------------------------------------------------------------
def wall_clock_offset_ns() -> int:
    """Epoch nanoseconds minus time.monotonic() nanoseconds, now: add it to a monotonic reading to get the
    wall-clock time span timestamps need (one offset for related readings keeps their order exact)."""
    return time.time_ns() - int(time.monotonic() * 1e9)


def wall_ns(monotonic_s: float, offset_ns: Optional[int] = None) -> int:
    """A time.monotonic() reading as epoch nanoseconds."""
    return (wall_clock_offset_ns() if offset_ns is None else offset_ns) + int(monotonic_s * 1e9)


def add_engine_spans(parent: Any, *, submitted_s: float, first_token_s: Optional[float], finished_s: float,
                     scheduled_s: Optional[float] = None, attributes: Optional[Mapping[str, Any]] = None) -> None:
    """Child spans of the replica span from the engine stream's timestamps (time.monotonic()):
    herd.engine.queue (submitted -> first scheduled), herd.engine.prefill (first scheduled -> first token) and
    herd.engine.decode (first token -> finished). Without `scheduled_s` (a request that never left the
    queue) the prefill span starts at submission and says it holds the queue wait."""
    if parent is None:
        return
    attrs = dict(attributes or {})
    offset = wall_clock_offset_ns()
    prefill_end = first_token_s if first_token_s is not None else finished_s
    prefill_attrs = attrs
    if scheduled_s is not None:
        queue = start_span("herd.engine.queue", parent, attrs, start_ns=wall_ns(submitted_s, offset))
        end_span(queue, end_ns=wall_ns(scheduled_s, offset))
    else:
        scheduled_s, prefill_attrs = submitted_s, {**attrs, "herd.engine.includes_queue_wait": True}
    prefill = start_span("herd.engine.prefill", parent, prefill_attrs, start_ns=wall_ns(scheduled_s, offset))
    end_span(prefill, end_ns=wall_ns(prefill_end, offset))
    if first_token_s is not None:
        decode = start_span("herd.engine.decode", parent, attrs, start_ns=wall_ns(first_token_s, offset))
        end_span(decode, end_ns=wall_ns(finished_s, offset))
