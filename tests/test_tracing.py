"""OpenTelemetry tracing: off by default (nothing of the SDK imported); on, one request is one trace, ingress ->
router -> replica -> engine, continuing the client's traceparent. First the pieces in one process with the SDK's
InMemorySpanExporter, then a real herd serve exporting over OTLP to a collector in this test."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent import futures

import pytest

from cluster import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


def test_off_by_default_imports_no_sdk():
    code = """
import sys
from cluster import tracing
from cluster.request_context import outgoing_context, request_scope
import cluster.ingress, cluster.deployment, cluster.routing
assert tracing.configure(None, "x") is False and tracing.configure({"enabled": False}, "x") is False
with request_scope("r1"):
    assert outgoing_context() == {"request_id": "r1"}
assert tracing.start_request_span("Generate", [("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]) is None
assert tracing.extract({"traceparent": "x"}) is None
tracing.end_span(None); tracing.add_engine_spans(None, submitted_s=0, first_token_s=None, finished_s=1)
bad = sorted(m for m in sys.modules if m.startswith(("opentelemetry.exporter", "cluster.tracing_")))
assert not bad, bad
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ENABLE_AUTO_CONNECT": "0"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture
def memory_spans():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    assert tracing.configure({"enabled": True, "service_name": "herd-test"}, "test", span_exporter=exporter)
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


def test_one_request_one_trace_in_process(memory_spans):
    """The hooks the ingress, router and replica call, in the order a request meets them."""
    from cluster.request_context import outgoing_context, set_request_id
    from tests.test_routing import FakeReplica, make_router, request

    async def ingress_side():   # a Serve request's own task
        span = tracing.start_request_span("GenerateRequest", [("traceparent", TRACEPARENT), ("x-other", "1")])
        set_request_id("rid-9")
        tracing.set_attribute(span, "herd.request_id", "rid-9")
        context = outgoing_context()
        assert context["request_id"] == "rid-9" and context["traceparent"].split("-")[1] == TRACE_ID
        return span, context

    ingress, context = asyncio.run(ingress_side())
    # Router: the model call's pending request carries the context; its span goes in between.
    async def router_side():    # (Serve's router lives on an event loop)
        router, replica = make_router(), FakeReplica("r1")
        router.update_replicas([replica])
        pending = request(range(12))
        pending.kwargs["context"] = context
        await router.choose_replicas([replica], pending)
        router.on_request_routed(pending, replica.replica_id, None)

    asyncio.run(router_side())
    # Replica: its span continues the context the router handed on; engine spans from its timestamps.
    t0 = time.monotonic()
    span = tracing.start_span("herd.replica.generate", context, {"herd.request_id": "rid-9"}, kind="server")
    tracing.add_engine_spans(span, submitted_s=t0, first_token_s=t0 + 0.01, finished_s=t0 + 0.02,
                             scheduled_s=t0 + 0.004, attributes={"herd.prompt_tokens": 12, "herd.cached_tokens": None})
    tracing.end_span(span)
    tracing.end_span(ingress, error=tracing.grpc_error(None))

    spans = {s.name: s for s in memory_spans.get_finished_spans()}
    assert set(spans) == {"herd.ingress GenerateRequest", "herd.router", "herd.replica.generate",
                          "herd.engine.queue", "herd.engine.prefill", "herd.engine.decode"}
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {TRACE_ID}
    parent = {name: format(s.parent.span_id, "016x") for name, s in spans.items()}
    span_id = {name: format(s.context.span_id, "016x") for name, s in spans.items()}
    assert parent["herd.ingress GenerateRequest"] == CLIENT_SPAN
    assert parent["herd.router"] == span_id["herd.ingress GenerateRequest"]
    assert parent["herd.replica.generate"] == span_id["herd.router"]
    assert parent["herd.engine.prefill"] == parent["herd.engine.decode"] == span_id["herd.replica.generate"]
    assert spans["herd.router"].attributes["herd.route.reason"] == "fallback"
    assert spans["herd.router"].attributes["herd.route.prompt_blocks"] == 3
    assert spans["herd.router"].attributes["herd.replica"] == "r1"
    assert parent["herd.engine.queue"] == span_id["herd.replica.generate"]
    # queue wait, then prefill, then decode, back to back
    assert spans["herd.engine.queue"].end_time == spans["herd.engine.prefill"].start_time
    assert "herd.engine.includes_queue_wait" not in spans["herd.engine.prefill"].attributes
    assert "herd.cached_tokens" not in spans["herd.engine.prefill"].attributes   # None is left out
    assert spans["herd.engine.decode"].start_time == spans["herd.engine.prefill"].end_time
    assert all(spans[n].attributes["herd.request_id"] == "rid-9"
               for n in ("herd.ingress GenerateRequest", "herd.router", "herd.replica.generate"))


# ---- a real herd serve exporting to an OTLP collector in this process -----------------------------------------
class Collector:
    """An OTLP/gRPC trace collector on 127.0.0.1 keeping every span it receives (as protobuf)."""

    def __init__(self):
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        spans, lock = [], threading.Lock()

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                with lock:
                    for rs in request.resource_spans:
                        component = next((a.value.string_value for a in rs.resource.attributes
                                          if a.key == "herd.component"), "")
                        for ss in rs.scope_spans:
                            spans.extend((component, s) for s in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.spans, self.lock = spans, lock
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def trace(self, trace_id: str) -> dict:
        with self.lock:
            return {s.name: (component, s) for component, s in self.spans if s.trace_id.hex() == trace_id}


@pytest.fixture(scope="module")
def collector():
    c = Collector()
    yield c
    c.server.stop(0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, collector):
    from tests.serve_fixtures import running_herd_cluster
    from workers.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("trace-ckpt") / "m", "llama32-1b-mini", dtype="float32")
    config = {"tracing": {"enabled": True, "otlp_endpoint": f"http://127.0.0.1:{collector.port}"},
              "models": [{"name": "tiny", "path": str(path), "max_model_len": 128,
                          "resources_per_shard": {"CPU": 0.25}, "kv_cache_memory": 4 << 20}]}
    with running_herd_cluster(config, num_cpus=2) as c:
        yield c


def _wait_trace(collector: Collector, trace_id: str, names: set, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s   # the processes export in batches every few seconds
    while time.monotonic() < deadline:
        got = collector.trace(trace_id)
        if names <= set(got):
            return got
        time.sleep(0.5)
    raise AssertionError(f"spans of trace {trace_id}: {sorted(collector.trace(trace_id))}, want {sorted(names)}")


WANT = {"herd.router", "herd.replica.generate", "herd.engine.queue", "herd.engine.prefill", "herd.engine.decode"}


@pytest.mark.slow
def test_grpc_request_is_one_trace_across_processes(served, collector):
    from cluster.pb import inference_pb2 as pb
    from cluster.pb import inference_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceStub(served.channel())
    responses = list(stub.Generate(pb.GenerateRequest(model="tiny", text="hello", request_id="traced-1",
                                                      sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True)),
                                   metadata=[("traceparent", TRACEPARENT)], timeout=120))
    assert responses[-1].finish_reason == "length"
    spans = _wait_trace(collector, TRACE_ID, WANT | {"herd.ingress GenerateRequest"})
    ingress = spans["herd.ingress GenerateRequest"]
    router, replica = spans["herd.router"], spans["herd.replica.generate"]
    prefill, decode = spans["herd.engine.prefill"], spans["herd.engine.decode"]
    assert ingress[1].parent_span_id.hex() == CLIENT_SPAN
    assert router[1].parent_span_id == ingress[1].span_id
    assert replica[1].parent_span_id == router[1].span_id
    assert prefill[1].parent_span_id == decode[1].parent_span_id == replica[1].span_id
    # Where each span was made: the router runs in the ingress's process, the engine spans in the replica's.
    assert (ingress[0], router[0], replica[0], prefill[0]) == ("ingress", "ingress", "model-tiny", "model-tiny")
    attrs = {name: {a.key: a.value for a in s.attributes} for name, (_, s) in spans.items()}
    assert attrs["herd.ingress GenerateRequest"]["herd.request_id"].string_value == "traced-1"
    assert attrs["herd.replica.generate"]["herd.request_id"].string_value == "traced-1"
    assert attrs["herd.engine.decode"]["herd.completion_tokens"].int_value == 3
    assert ingress[1].start_time_unix_nano <= router[1].start_time_unix_nano <= replica[1].start_time_unix_nano
    assert prefill[1].end_time_unix_nano <= decode[1].end_time_unix_nano <= ingress[1].end_time_unix_nano
    queue = spans["herd.engine.queue"]   # the engine's own first-scheduled time ends the queue wait
    assert replica[1].start_time_unix_nano <= queue[1].end_time_unix_nano == prefill[1].start_time_unix_nano


@pytest.mark.slow
def test_http_request_continues_the_traceparent_header(served, collector):
    import httpx

    trace_id = "0af7651916cd43dd8448eb211c80319c"
    r = httpx.post(f"{served.http_url}/v1/completions", timeout=120,
                   headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
                   json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    spans = _wait_trace(collector, trace_id, WANT | {"herd.ingress POST /v1/completions"})
    ingress = spans["herd.ingress POST /v1/completions"][1]
    assert ingress.parent_span_id.hex() == "b7ad6b7169203331"
    assert spans["herd.router"][1].parent_span_id == ingress.span_id
    status = {a.key: a.value.int_value for a in ingress.attributes}["http.response.status_code"]
    assert status == 200


def test_a_request_that_never_left_the_queue_has_no_queue_span(memory_spans):
    t0 = time.monotonic()
    span = tracing.start_span("herd.replica.generate", None, {}, kind="server")
    tracing.add_engine_spans(span, submitted_s=t0, first_token_s=None, finished_s=t0 + 0.01)
    tracing.end_span(span)
    spans = {s.name: s for s in memory_spans.get_finished_spans()}
    assert "herd.engine.queue" not in spans and "herd.engine.decode" not in spans
    assert spans["herd.engine.prefill"].attributes["herd.engine.includes_queue_wait"] is True
