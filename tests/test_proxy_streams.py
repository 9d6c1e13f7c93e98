"""herd's services on Serve's own gRPC proxy server class (cluster/proxy_streams.py), over loopback: a request
whose bytes are not its message is INVALID_ARGUMENT from the proxy, and never reaches Serve's handler."""
from __future__ import annotations

import asyncio

import grpc

from cluster.pb import inference_pb2 as pb


class _AnyServicer:
    """The servicer Serve passes: its methods are never called (Serve's handlers replace them)."""

    def __getattr__(self, name):
        return lambda *a, **k: None


def _identity(data: bytes) -> bytes:
    return data


async def _serve_and_call(calls, factory=None):
    from ray.serve._private.grpc_util import gRPCGenericServer

    from cluster.proxy_streams import add_inference_servicer

    reached = []

    def reaching(service_method, streaming_type):
        if streaming_type.name == "UNARY_STREAM":
            async def stream(request, context):
                reached.append((service_method, request))
                yield b"\x08\x01"
            return stream

        async def unary(request, context):
            reached.append((service_method, request))
            return b""
        return unary

    server = gRPCGenericServer(factory or reaching)
    add_inference_servicer(_AnyServicer(), server)
    assert "_override_method_handler" not in vars(server)   # Serve's own method again after registering
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            results = []
            for method, kind, payload, *metadata in calls:
                call = getattr(channel, kind)(method, request_serializer=_identity, response_deserializer=_identity)
                try:
                    if kind == "unary_stream":
                        results.append(("OK", [m async for m in call(payload, timeout=10, metadata=metadata)]))
                    else:
                        results.append(("OK", await call(payload, timeout=10, metadata=metadata)))
                except grpc.aio.AioRpcError as e:
                    results.append((e.code().name, e.details()))
            return results, reached
    finally:
        await server.stop(None)


def test_bytes_that_are_not_the_message_are_invalid_argument_at_the_proxy():
    good = pb.GenerateRequest(model="m", text="hi").SerializeToString()
    results, reached = asyncio.run(_serve_and_call([
        ("/herd.v1.Inference/Generate", "unary_stream", b"\xff\xff\xff"),
        ("/herd.v1.Inference/Tokenize", "unary_unary", b"\x0a\xff\xff\xff\xff\x0f"),
        ("/herd.v1.Inference/Generate", "unary_stream", good),
    ]))
    (stream_code, stream_details), (unary_code, unary_details), good_result = results
    assert stream_code == unary_code == "INVALID_ARGUMENT"
    assert stream_details.startswith("/herd.v1.Inference/Generate: the request is not a valid message")
    assert unary_details.startswith("/herd.v1.Inference/Tokenize: the request is not a valid message")
    assert good_result == ("OK", [b"\x08\x01"])
    # Only the well-formed request reached Serve's handler, parsed.
    assert [(method, type(request)) for method, request in reached] == [("/herd.v1.Inference/Generate",
                                                                          pb.GenerateRequest)]


def test_a_plain_grpc_server_gets_the_generated_servicer():
    """Outside Serve's proxy (no handler factory) the generated registration is used as is."""
    from cluster.proxy_streams import add_inference_servicer

    async def register():
        server = grpc.aio.server()
        add_inference_servicer(_AnyServicer(), server)   # must not raise, nor set anything on the server
        return vars(server)
    assert "service_handler_factory" not in asyncio.run(register())


def test_a_call_with_no_application_behind_the_proxy_is_unavailable():
    """Serve's answer when herd's application is not deployed (herd serve starting, or draining on its way down)
    is NOT_FOUND, which clients take as final; herd's proxy services make it UNAVAILABLE, which they retry. A
    call that names no application is herd's (also when other applications run on the same Serve: Serve would
    answer NOT_FOUND "Application metadata not set"); one that names another application, and NOT_FOUND of an
    unknown model, pass as the handler set them."""
    from ray.serve._private.grpc_util import set_grpc_code_and_details
    from ray.serve._private.proxy_request_response import ResponseStatus

    from cluster.proxy_not_serving import NO_APPLICATION_DETAILS, is_no_application

    def not_found(message: str) -> ResponseStatus:
        return ResponseStatus(code=grpc.StatusCode.NOT_FOUND, is_error=True, message=message)

    def status(service_method: str, context) -> ResponseStatus:
        if service_method.endswith("ListModels"):
            return not_found("model 'x' is not served")
        [app] = [value for key, value in context.invocation_metadata() if key == "application"]
        return not_found(f"Application '{app}' not found. Ping /ray.serve.RayServeAPIService/ListApplications "
                         "for available applications.")

    def factory(service_method, streaming_type):
        if streaming_type.name == "UNARY_STREAM":
            async def stream(request, context):
                set_grpc_code_and_details(context, status(service_method, context))
                return
                yield
            return stream

        async def unary(request, context):
            set_grpc_code_and_details(context, status(service_method, context))
            return b""
        return unary

    generate = pb.GenerateRequest(model="m", text="hi").SerializeToString()
    tokenize = pb.TokenizeRequest(model="m", text="hi").SerializeToString()
    results, _ = asyncio.run(_serve_and_call([
        ("/herd.v1.Inference/Generate", "unary_stream", generate),
        ("/herd.v1.Inference/Tokenize", "unary_unary", tokenize),
        ("/herd.v1.Inference/Tokenize", "unary_unary", tokenize, ("application", "other")),
        ("/herd.v1.Inference/ListModels", "unary_unary", b""),
    ], factory=factory))
    assert results[0] == results[1] == ("UNAVAILABLE", NO_APPLICATION_DETAILS)
    assert results[2][0] == "NOT_FOUND" and results[2][1].startswith("Application 'other' not found.")
    assert results[3] == ("NOT_FOUND", "model 'x' is not served")
    assert is_no_application(grpc.StatusCode.NOT_FOUND, "Application metadata not set. Ping "
                             "/ray.serve.RayServeAPIService/ListApplications for available applications.")


def test_calls_that_name_no_application_go_to_herds(monkeypatch):
    """The `application` metadata Serve's proxy routes by: herd's application unless the client named one;
    the chart names it where serve.applicationName is not herd (HERD_SERVE_APPLICATION)."""
    from cluster.app_name import APPLICATION_ENV
    from cluster.proxy_streams import with_application

    monkeypatch.delenv(APPLICATION_ENV, raising=False)
    assert with_application((("authorization", "Bearer k"),)) == (("authorization", "Bearer k"), ("application", "herd"))
    assert with_application(None) == (("application", "herd"),)
    assert with_application((("application", "other"),)) == (("application", "other"),)
    monkeypatch.setenv(APPLICATION_ENV, "llm")
    assert with_application(()) == (("application", "llm"),)


def test_the_http_proxy_answers_503_while_no_application_is_deployed(monkeypatch):
    """install_http_not_serving (a gRPC servicer function, so Serve runs it in every proxy process) replaces
    Serve's HTTP 404 with a 503 in OpenAI's error body while herd's application has no route; with it, Serve's
    404."""
    import json
    from types import SimpleNamespace

    from ray.serve._private import proxy
    from ray.serve._private.proxy_request_response import ResponseStatus

    from cluster.proxy_not_serving import NO_APPLICATION_DETAILS, install_http_not_serving

    monkeypatch.setattr(proxy.HTTPProxy, "not_found_response", proxy.HTTPProxy.not_found_response)  # restored
    install_http_not_serving(_AnyServicer(), None)
    installed = proxy.HTTPProxy.not_found_response
    install_http_not_serving(_AnyServicer(), None)   # a second proxy start in the process: wrapped once
    assert proxy.HTTPProxy.not_found_response is installed

    async def answer(route_info):
        this = SimpleNamespace(proxy_router=SimpleNamespace(route_info=route_info))
        request = SimpleNamespace(path="/v1/completions")
        return [m async for m in proxy.HTTPProxy.not_found_response(this, request)]

    start, body, status = asyncio.run(answer({}))
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"]) == {"error": {"message": NO_APPLICATION_DETAILS, "code": "unavailable",
                                                  "type": "service_unavailable_error", "param": None}}
    assert isinstance(status, ResponseStatus) and status.code == 503 and status.is_error
    # Only another application's route (herd's draining on a shared Serve): still not serving.
    assert asyncio.run(answer({"/other": SimpleNamespace(app_name="other")}))[0]["status"] == 503
    served = asyncio.run(answer({"/": SimpleNamespace(app_name="herd")}))  # herd's deployed: Serve's own answer
    assert served[0]["status"] == 404 and served[-1].code == 404


def test_a_call_whose_replica_died_is_unavailable_not_internal(monkeypatch):
    """install_replica_lost (a gRPC servicer function, so Serve runs it in every proxy process) makes Serve's proxy
    answer a call whose replica died (Ray's actor errors, by type) UNAVAILABLE / 503 with Retry-After in OpenAI's
    error body; every other exception keeps Serve's answer."""
    import json

    import grpc
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.serve._private import proxy

    from cluster.proxy_replica_lost import REPLICA_LOST_DETAILS, install_replica_lost

    for name in ("get_grpc_response_status", "get_http_response_status", "send_http_response_on_exception"):
        monkeypatch.setattr(proxy, name, getattr(proxy, name))   # restored after the test
    monkeypatch.setattr(proxy.HTTPProxy, "send_request_to_replica", proxy.HTTPProxy.send_request_to_replica)
    install_replica_lost(_AnyServicer(), None)
    installed = proxy.get_grpc_response_status
    install_replica_lost(_AnyServicer(), None)       # a second proxy start in the process: wrapped once
    assert proxy.get_grpc_response_status is installed
    assert proxy.HTTPProxy.send_request_to_replica.__name__ == "send_request_to_replica"   # herd's wrapper
    assert proxy.HTTPProxy.send_request_to_replica.__module__ == "cluster.proxy_replica_lost"

    for died in (ActorDiedError(), ActorUnavailableError("Actor is unavailable.", b"\0" * 16)):
        status = proxy.get_grpc_response_status(died, 600, "rid")
        assert (status.code, status.message, status.is_error) == (grpc.StatusCode.UNAVAILABLE, REPLICA_LOST_DETAILS,
                                                                 True)
        status = proxy.get_http_response_status(died, 600, "rid")
        assert (status.code, status.message) == (503, REPLICA_LOST_DETAILS)
        start, body = proxy.send_http_response_on_exception(status, False)
        headers = dict(start["headers"])
        assert start["status"] == 503 and headers[b"retry-after"] == b"1"
        assert json.loads(body["body"])["error"]["message"] == REPLICA_LOST_DETAILS
        assert proxy.send_http_response_on_exception(status, True) == []   # a response that began is cut
    # Serve's own answers otherwise
    assert proxy.get_grpc_response_status(TimeoutError(), 600, "rid").code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert proxy.get_grpc_response_status(ValueError("boom"), 600, "rid").code == grpc.StatusCode.INTERNAL
    timed_out = proxy.get_http_response_status(TimeoutError(), 600, "rid")
    assert timed_out.code == 408
    assert proxy.send_http_response_on_exception(timed_out, False)[0]["status"] == 408


def test_a_begun_event_stream_whose_replica_died_ends_with_an_error_event():
    """The HTTP response stream herd's proxy hook wraps: herd's event stream that had begun when its replica died
    gets an SSE error event and [DONE] before Serve's final status; any other response is left as Serve sent it.
    The fake stream does what Serve's does: it asks for the status of the exception that ended it, and yields the
    status of the response's start last."""
    import json
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError
    from ray.serve._private.http_util import get_http_response_status
    from ray.serve._private.proxy_request_response import ResponseStatus

    from cluster.proxy_replica_lost import (REPLICA_LOST_DETAILS, _event_stream_ended_in_band,
                                            _replica_lost_status, http_status)

    status_of = _replica_lost_status(get_http_response_status, http_status)

    def serve_stream(content_type: bytes, error: Exception):
        async def send_request_to_replica(self, request_id, internal_request_id, handle, proxy_request):
            yield {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}
            yield {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}
            status_of(error, 600, request_id)
            yield ResponseStatus(code="200")
        return send_request_to_replica

    def messages(content_type: bytes, error: Exception, app: str = "herd") -> list:
        wrapped = _event_stream_ended_in_band(serve_stream(content_type, error))

        async def run():
            return [m async for m in wrapped(None, "rid", "iid", SimpleNamespace(app_name=app), None)]
        return asyncio.run(run())

    start, first, end, status = messages(b"text/event-stream; charset=utf-8", ActorDiedError())
    assert status.code == "200" and end["more_body"] is False
    events = end["body"].decode().split("\n\n")
    assert events[1:] == ["data: [DONE]", ""]
    assert json.loads(events[0].removeprefix("data: "))["error"] == {
        "message": REPLICA_LOST_DETAILS, "type": "service_unavailable_error", "param": None, "code": "unavailable"}
    assert len(messages(b"application/json", ActorDiedError())) == 3              # not an event stream: cut
    assert len(messages(b"text/event-stream", ActorDiedError(), app="other")) == 3  # another application's
    assert len(messages(b"text/event-stream", TimeoutError())) == 3               # not a lost replica
