"""gRPC server reflection on both protocol versions: `grpc.reflection.v1` beside `v1alpha`.

Serve's proxy (Ray 2.60) turns on only `grpc.reflection.v1alpha.ServerReflection` (grpcio-reflection ships no
other), while current grpcurl, Postman and grpcui ask `grpc.reflection.v1` first. The two versions are the
same protocol under another package name — every message has the same fields and numbers — so one
servicer answers both: the v1 service is registered with v1alpha's (wire-identical) message codecs, and a
v1 copy of the reflection .proto is added to the descriptor pool so that v1 itself can be described too.

`add_reflection_v1_to_server` is a `grpc_servicer_functions` entry (cluster.app adds it, last, when
`enable_reflection` is on; Serve still adds v1alpha itself). It runs in the proxy with the real server:
reflection is a passthrough service (answered by the proxy, never routed to a replica), and it lists the
services registered before it.
"""
from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

V1ALPHA_SERVICE = v1alpha_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_PROTO_FILE = "grpc/reflection/v1/reflection.proto"
# Serve's own API service, which is not herd's to advertise.
_SERVE_API_SERVICE = "ray.serve.RayServeAPIService"


def _v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's reflection.proto renamed to package grpc.reflection.v1 (the v1 .proto has the same messages)."""
    fdp = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(fdp)
    old, new = f".{v1alpha_pb2.DESCRIPTOR.package}.", f".{V1_PACKAGE}."
    fdp.name, fdp.package = V1_PROTO_FILE, V1_PACKAGE
    for message in fdp.message_type:
        for f in message.field:
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old):]
    for service in fdp.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return fdp


def register_v1_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> None:
    pool = pool or descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_PROTO_FILE)
    except KeyError:
        pool.Add(_v1_file_descriptor())


def registered_service_names(server) -> list[str]:
    """Services already on Serve's gRPC server ("/pkg.Service/Method" keys of its generic handlers)."""
    names = {key.split("/")[1] for handlers in getattr(server, "generic_rpc_handlers", [])
             for key in handlers[0]._method_handlers}
    names.discard(_SERVE_API_SERVICE)
    return sorted(names)


def add_reflection_v1_to_server(servicer, server) -> None:
    """A grpc_servicer_functions entry: serve grpc.reflection.v1 on the proxy's server (`servicer` is Serve's
    placeholder and is not used)."""
    register_v1_descriptor()
    names = registered_service_names(server) + [V1_SERVICE, V1ALPHA_SERVICE]
    reflection = ReflectionServicer(names)
    handler = grpc.method_handlers_generic_handler(V1_SERVICE, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            reflection.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString),
    })
    if hasattr(server, "add_passthrough_service"):  # Serve's server: answer here, do not route to a replica
        server.add_passthrough_service(V1_SERVICE)
    server.add_generic_rpc_handlers((handler,))
