"""What Serve's proxies answer while no herd application is deployed behind them.

That happens while `herd serve` starts, and while it drains on its way down (cluster/serve_cli.py deletes the
application so that its replicas finish their open streams). Serve answers NOT_FOUND on gRPC ("Application
metadata not set") and 404 on HTTP ("Path '/v1/completions' not found"). Clients and load balancers take
both as final. herd answers UNAVAILABLE and 503 with Retry-After instead, which they retry (the openai client
retries a 503 by itself).

    grpc_servicer_functions: [..., "cluster.proxy_not_serving.install_http_not_serving"]

- gRPC: the call context of cluster.proxy_streams turns Serve's NOT_FOUND for herd's application into
  UNAVAILABLE (`is_no_application`).
- HTTP: Serve's HTTP proxy (Ray 2.60, proxy.py `HTTPProxy.not_found_response`) offers no hook. Serve calls
  every gRPC servicer function in each proxy process before its servers start, on any cluster (local, joined,
  KubeRay), so `install_http_not_serving`, listed among them, replaces that method on the class. While herd's
  application has no route (none at all, or only other applications' on a shared Serve) it answers 503. With
  herd's route it gives Serve's 404 as before (herd's application is at "/" by default, so while it is
  deployed every path has a route).

Runs in Serve's proxy process: keep the imports light.
"""
from __future__ import annotations

import json

from cluster.app_name import served_application

NO_APPLICATION_DETAILS = "herd is not serving behind this proxy now (starting up or shutting down); retry"


def is_no_application(code, details) -> bool:
    """Is (code, details) Serve's gRPC answer for a call that herd's application is not there to take? (Ray
    2.60, proxy.py not_found_response: "Application metadata not set." with no application at all, "Application
    'herd' not found." with other applications, herd's named by cluster.proxy_streams.) A call naming another
    application keeps Serve's NOT_FOUND."""
    import grpc

    return code == grpc.StatusCode.NOT_FOUND and isinstance(details, str) and details.startswith(
        ("Application metadata not set.", f"Application '{served_application()}' not found.")) \
        and "ListApplications" in details


def unavailable_body(details: str) -> bytes:
    """A 503's body, in OpenAI's error shape (cluster.errors)."""
    from cluster.errors import ApiError

    return json.dumps(ApiError("UNAVAILABLE", details).openai_body()).encode()


def unavailable_response(details: str) -> list[dict]:
    """The ASGI messages of a 503 with Retry-After and `details` in OpenAI's error body (also the answer of
    cluster.proxy_replica_lost)."""
    from cluster.errors import RETRY_AFTER_S

    body = unavailable_body(details)
    return [{"type": "http.response.start", "status": 503,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"retry-after", str(RETRY_AFTER_S).encode())]},
            {"type": "http.response.body", "body": body}]


def install_http_not_serving(servicer=None, server=None) -> None:
    """A gRPC servicer function that adds no service: it makes this process's Serve HTTP proxy answer 503 (not
    404) while herd's application has no route in it (module doc). Serve calls it with its mock servicer and
    its gRPC server."""
    from ray.serve._private import proxy

    serve_not_found = proxy.HTTPProxy.not_found_response
    if getattr(serve_not_found, "herd_not_serving", False):
        return

    async def not_found_response(self, proxy_request):
        herd = served_application()
        if any(endpoint.app_name == herd for endpoint in self.proxy_router.route_info.values()):
            async for message in serve_not_found(self, proxy_request):
                yield message
            return
        from ray.serve._private.proxy_request_response import ResponseStatus

        for message in unavailable_response(NO_APPLICATION_DETAILS):
            yield message
        yield ResponseStatus(code=503, is_error=True, message=NO_APPLICATION_DETAILS)

    not_found_response.herd_not_serving = True
    proxy.HTTPProxy.not_found_response = not_found_response
