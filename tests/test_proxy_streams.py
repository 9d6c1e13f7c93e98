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


async def _serve_and_call(calls):
    from ray.serve._private.grpc_util import gRPCGenericServer

    from cluster.proxy_streams import add_inference_servicer

    reached = []

    def factory(service_method, streaming_type):
        if streaming_type.name == "UNARY_STREAM":
            async def stream(request, context):
                reached.append((service_method, request))
                yield b"\x08\x01"
            return stream

        async def unary(request, context):
            reached.append((service_method, request))
            return b""
        return unary

    server = gRPCGenericServer(factory)
    add_inference_servicer(_AnyServicer(), server)
    assert "_override_method_handler" not in vars(server)   # Serve's own method again after registering
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            results = []
            for method, kind, payload in calls:
                call = getattr(channel, kind)(method, request_serializer=_identity, response_deserializer=_identity)
                try:
                    if kind == "unary_stream":
                        results.append(("OK", [m async for m in call(payload, timeout=10)]))
                    else:
                        results.append(("OK", await call(payload, timeout=10)))
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
