"""What Serve's proxies answer when the replica a call was on stops before it answered.

An ingress replica can die with calls in flight (its process killed or out of memory, its node lost). Serve's
proxy (Ray 2.60, proxy.py) then answers a gRPC call INTERNAL with Ray's own message ("The actor 91f0...01000000
is unavailable: Actor is unavailable.. The task may or may not have been executed ...") and an HTTP request 500
"Internal Server Error" in plain text. INTERNAL is final to gRPC clients and to retry policies, and its message
names Ray's actor. Nothing is left behind on the models' side: a model replica cancels the streams whose caller
died and frees their KV blocks (measured: 16 streams, every block back within a second of the kill).

herd answers UNAVAILABLE (gRPC) and 503 with Retry-After in OpenAI's error body (HTTP), which clients retry,
while Serve starts a replacement (with `ingress_replicas` > 1 another replica takes the retry at once). A gRPC
stream that had already sent tokens ends UNAVAILABLE too. An HTTP event stream of herd's that had begun ends
with an SSE error event and `data: [DONE]`, as when a model replica dies (cluster.openai_http), where Serve cut
the connection mid-stream (the openai client raised a protocol error, not an APIError); any other HTTP response
that had begun is cut, as before.

    grpc_servicer_functions: [..., "cluster.proxy_replica_lost.install_replica_lost"]

Serve turns a request's exception into a status with `get_grpc_response_status` / `get_http_response_status`
and writes an HTTP error with `send_http_response_on_exception`, names that proxy.py imports, and streams an
HTTP response with `HTTPProxy.send_request_to_replica`: `install_replica_lost` wraps them there, in every proxy
process (Serve calls each gRPC servicer function in each proxy process before its servers start, on any
cluster). Only Ray's actor errors change (RayActorError: ActorDiedError,
ActorUnavailableError, by type); every other exception keeps Serve's answer. Serve's own warning with Ray's
message stays in the proxy's log. On a Serve that other applications share, their calls get the same answer.

Runs in Serve's proxy process: keep the imports light.
"""
from __future__ import annotations

import contextvars
import json

from cluster.app_name import served_application
from cluster.proxy_not_serving import unavailable_response

REPLICA_LOST_DETAILS = "the replica serving this request stopped before it answered; retry"
# Set when Serve's status of this request's exception was "replica lost": Serve yields the status of the
# response's start as a stream's final status, so the stream's wrapper learns of the loss here. (An async
# generator runs in the context of the task iterating it, so what Serve's generator sets, its wrapper reads.)
_replica_lost = contextvars.ContextVar("herd_replica_lost", default=False)


def install_replica_lost(servicer=None, server=None) -> None:
    """A gRPC servicer function that adds no service: this process's Serve proxies answer a call whose replica
    died UNAVAILABLE / 503 (module doc). Serve calls it with its mock servicer and its gRPC server."""
    from ray.serve._private import proxy

    if getattr(proxy.get_grpc_response_status, "herd_replica_lost", False):
        return
    proxy.get_grpc_response_status = _replica_lost_status(proxy.get_grpc_response_status, grpc_status)
    proxy.get_http_response_status = _replica_lost_status(proxy.get_http_response_status, http_status)
    proxy.send_http_response_on_exception = _replica_lost_response(proxy.send_http_response_on_exception)
    proxy.HTTPProxy.send_request_to_replica = _event_stream_ended_in_band(proxy.HTTPProxy.send_request_to_replica)


def grpc_status():
    import grpc
    from ray.serve._private.proxy_request_response import ResponseStatus

    return ResponseStatus(code=grpc.StatusCode.UNAVAILABLE, is_error=True, message=REPLICA_LOST_DETAILS)


def http_status():
    from ray.serve._private.proxy_request_response import ResponseStatus

    from cluster.errors import RETRY_AFTER_S

    return ResponseStatus(code=503, is_error=True, message=REPLICA_LOST_DETAILS,
                          headers=[(b"retry-after", str(RETRY_AFTER_S).encode())])


def _replica_lost_status(serve_status, lost_status):
    def status(exc, request_timeout_s, request_id):
        from ray.exceptions import RayActorError

        answer = serve_status(exc, request_timeout_s, request_id)   # Serve's log line, with Ray's message
        if not isinstance(exc, RayActorError):
            return answer
        _replica_lost.set(True)
        return lost_status()
    status.herd_replica_lost = True
    return status


def _replica_lost_response(serve_response):
    def response(status, response_started: bool):
        if status.message == REPLICA_LOST_DETAILS and not response_started:
            return unavailable_response(REPLICA_LOST_DETAILS)
        return serve_response(status, response_started)
    return response


def sse_error_end(details: str) -> bytes:
    """The end of an event stream whose replica died: an SSE error event in OpenAI's error body, then [DONE]
    (what cluster.openai_http's streams end with after an error)."""
    from cluster.errors import ApiError

    event = json.dumps(ApiError("UNAVAILABLE", details).openai_body(), separators=(",", ":"))
    return f"data: {event}\n\ndata: [DONE]\n\n".encode()


def _event_stream_ended_in_band(serve_send_request):
    """Serve's HTTP response stream of a request, with an SSE error event and [DONE] before the final status
    when herd's event stream had begun and its replica died (module doc)."""
    async def send_request_to_replica(self, request_id, internal_request_id, handle, *args, **kwargs):
        from ray.serve._private.proxy_request_response import ResponseStatus

        event_stream = False
        _replica_lost.set(False)
        async for message in serve_send_request(self, request_id, internal_request_id, handle, *args, **kwargs):
            if isinstance(message, dict) and message.get("type") == "http.response.start":
                event_stream = handle.app_name == served_application() and _is_event_stream(message)
            elif isinstance(message, ResponseStatus) and event_stream and _replica_lost.get():
                yield {"type": "http.response.body", "body": sse_error_end(REPLICA_LOST_DETAILS), "more_body": False}
            yield message
    return send_request_to_replica


def _is_event_stream(start: dict) -> bool:
    return any(name.lower() == b"content-type" and value.split(b";")[0].strip() == b"text/event-stream"
               for name, value in start.get("headers", ()))
