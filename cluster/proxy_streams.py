"""herd's gRPC services as Serve's proxy registers them, with every client cancel passed on to the replica.

    grpc_servicer_functions: [cluster.proxy_streams.add_inference_servicer, cluster.proxy_streams.add_health_servicer,
                              ...]

Serve's gRPC proxy (Ray 2.60, serve/_private/proxy.py) forwards a client's cancel of a streaming call only
when the cancel lands while the proxy awaits the replica's next message (ProxyResponseGenerator.__anext__
cancels the replica's response there). grpc.aio cancels the call's task wherever it waits; while it waits
for a message to be written to the client, the cancel leaves Serve's generator suspended at a `yield`,
nobody cancels the response, and the ingress and the model go on streaming to nobody until the stream ends
(measured: a cancel right after the first token of a 1,948-token stream was lost in 5 of 12 tries, each
sequence running to max_tokens with its KV blocks held; a Health.Watch whose cancel is lost would hold its
watcher seat for good).

Here Serve's handler for a server-streaming method runs in a task of its own that only ever waits inside
Serve's generator (its messages go to an unbounded queue, which never blocks), and the call's done callback
(grpc.aio runs it when the call ends: cancel, deadline, disconnect) cancels that task, so the cancel always
arrives where Serve forwards it. The queue holds what the client has not read yet, which Ray's object
stream on the proxy held before; a stream's messages are bounded by its request's `max_tokens`.

A request whose bytes do not parse as its method's message is answered INVALID_ARGUMENT by the proxy itself
(`MalformedRequest`), where grpc.aio would answer UNKNOWN with protobuf's exception class in the details.

A request that reaches the proxy while no herd application is deployed behind it (herd serve starting up, or
draining on its way down) gets UNAVAILABLE, which clients and load balancers retry elsewhere, instead of
Serve's NOT_FOUND "Application metadata not set", which they take as final (`_CallContext.set_details`;
cluster/proxy_not_serving.py, which does the same for HTTP).

A call to herd's services that names no application (`application` metadata) goes to herd's application
(`cluster.app_name.served_application`): Serve's proxy picks the only application when there is one, but
answers NOT_FOUND once another application runs beside herd's on the same Serve, and a Kubernetes gRPC probe
cannot send metadata at all.

These functions run in Serve's proxy process, with Serve's own gRPC server (the server whose
`service_handler_factory` turns every method into a call to the ingress): keep imports light.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Callable

from cluster.app_name import served_application
from cluster.proxy_not_serving import NO_APPLICATION_DETAILS, is_no_application


def add_inference_servicer(servicer, server) -> None:
    """herd.v1.Inference, its streaming methods cancel-safe (module doc)."""
    from cluster.pb.inference_pb2_grpc import add_InferenceServicer_to_server

    _register_cancel_safe(add_InferenceServicer_to_server, servicer, server)


def add_health_servicer(servicer, server) -> None:
    """grpc.health.v1.Health; Health.Watch is a stream that lives until the client leaves."""
    from grpc_health.v1.health_pb2_grpc import add_HealthServicer_to_server

    _register_cancel_safe(add_HealthServicer_to_server, servicer, server)


def _register_cancel_safe(add_servicer: Callable, servicer, server) -> None:
    """add_servicer(servicer, server) while the server's handler factory (Serve's) makes cancel-safe streams and
    its method handlers parse requests without raising. A server without them (a plain grpc server) gets the
    servicer as generated."""
    factory = getattr(server, "service_handler_factory", None)
    override = getattr(server, "_override_method_handler", None)
    if factory is None or override is None:
        add_servicer(servicer, server)
        return
    server.service_handler_factory = _cancel_safe_factory(factory)
    server._override_method_handler = _parsing_without_raising(override)
    try:
        add_servicer(servicer, server)
    finally:
        server.service_handler_factory = factory
        del server._override_method_handler          # Serve's class method again


class MalformedRequest:
    """A request whose bytes are not its method's message. grpc.aio answers a request deserializer that raises
    with UNKNOWN ("Unexpected <class 'DecodeError'>"); herd's handlers get this instead and answer
    INVALID_ARGUMENT, in the proxy, before anything reaches the ingress."""

    def __init__(self, service_method: str, error: Exception):
        self.details = f"{service_method}: the request is not a valid message of this method ({error})"


def _parsing_without_raising(override: Callable) -> Callable:
    """Serve's `_override_method_handler`, its handlers' request parsing turning bad bytes into a
    MalformedRequest."""
    def wrapped(service_method: str, method_handler):
        handler = override(service_method, method_handler)
        parse = handler.request_deserializer
        if parse is None:
            return handler

        def parse_or_mark(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and its kin
                return MalformedRequest(service_method, e)
        return handler._replace(request_deserializer=parse_or_mark)
    return wrapped


def _cancel_safe_factory(factory: Callable) -> Callable:
    def make(service_method: str, streaming_type) -> Callable:
        handler = factory(service_method=service_method, streaming_type=streaming_type)
        if streaming_type.name == "UNARY_STREAM":
            return cancel_safe_stream(handler)
        if streaming_type.name == "UNARY_UNARY":
            return refusing_malformed(handler)
        return handler
    return make


def refusing_malformed(handler: Callable) -> Callable:
    """A unary handler that answers a MalformedRequest with INVALID_ARGUMENT (and a call with no application
    behind the proxy with UNAVAILABLE, as _CallContext does)."""
    async def unary_unary(request, context):
        if isinstance(request, MalformedRequest):
            await _refuse(request, context)
        return await handler(request, _CallContext(context))
    return unary_unary


async def _refuse(request: MalformedRequest, context) -> None:
    import grpc

    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


def cancel_safe_stream(handler: Callable[[Any, Any], AsyncIterator]) -> Callable[[Any, Any], AsyncIterator]:
    """A server-streaming handler whose own iteration runs in a task that the call's end cancels (a
    MalformedRequest is refused at once)."""
    async def unary_stream(request, context) -> AsyncIterator:
        if isinstance(request, MalformedRequest):
            await _refuse(request, context)
        messages: asyncio.Queue = asyncio.Queue()

        async def pump(call: _CallContext) -> None:
            try:
                async for message in handler(request, call):
                    messages.put_nowait(message)
            except Exception as e:  # noqa: BLE001 - the call raises it (a cancel just ends the task)
                messages.put_nowait(_End(e))
                return
            messages.put_nowait(_End(None))

        call = _CallContext(context)
        task = asyncio.get_running_loop().create_task(pump(call))

        def call_ended(_context) -> None:
            call.ended = True
            _cancel_soon(task)

        context.add_done_callback(call_ended)
        try:
            while not isinstance(message := await messages.get(), _End):
                yield message
            if message.error is not None:
                raise message.error
        finally:
            _cancel_soon(task)
    return unary_stream


class _CallContext:
    """The call's grpc.aio context as Serve's handler sees it, safe to use once the call has ended: the handler
    runs on after a cancel (it logs the call, with its peer, and sets its status), but grpc has freed the call
    by then, and `peer()` on a freed call crashes the process (SIGSEGV, seen in the proxy). So what the
    handler reads is read once at the start, and what it sets after the end goes nowhere."""

    def __init__(self, context):
        self._context = context
        self._peer = context.peer()
        self._metadata = with_application(context.invocation_metadata())
        self._code = None
        self.ended = False

    def peer(self):
        return self._peer

    def invocation_metadata(self):
        return self._metadata

    def code(self):
        return None if self.ended else self._context.code()

    def set_code(self, code) -> None:
        if not self.ended:
            self._code = code
            self._context.set_code(code)

    def set_details(self, details) -> None:
        """Serve's NOT_FOUND for a proxy with no application behind it becomes UNAVAILABLE (module doc)."""
        if self.ended:
            return
        if is_no_application(self._code, details):
            import grpc

            self._context.set_code(grpc.StatusCode.UNAVAILABLE)
            details = NO_APPLICATION_DETAILS
        self._context.set_details(details)

    def details(self):
        return None if self.ended else self._context.details()

    def __getattr__(self, name: str):
        if self.ended and name.startswith("set_"):
            return _ignore
        return getattr(self._context, name)


def with_application(metadata):
    """The call's metadata, with herd's application added where the client named none (module doc)."""
    metadata = tuple(metadata or ())
    if any(key == "application" for key, _ in metadata):
        return metadata
    return (*metadata, ("application", served_application()))


def _ignore(*_args, **_kwargs) -> None:
    return None


class _End:
    """The handler's stream ended: normally (error None) or with `error`."""

    def __init__(self, error: Exception | None):
        self.error = error


def _cancel_soon(task: asyncio.Task) -> None:
    """Cancel `task` unless done, from whichever thread grpc runs the done callback on."""
    if task.done():
        return
    with contextlib.suppress(RuntimeError):  # the loop is closing: the task goes with it
        task.get_loop().call_soon_threadsafe(task.cancel)
