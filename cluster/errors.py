"""One error type for the edge, and its mapping to gRPC status codes, HTTP statuses and OpenAI error bodies.

Everything the ingress can fail with becomes an `ApiError(code, message, field)`, where `code` is the name of a
gRPC status code. The gRPC servicer sets that code; the OpenAI HTTP routes turn it into a status and an
OpenAI-shaped body. A client mistake is never INTERNAL: the engine's typed errors (workers.errors) say what
kind of failure they are, and Ray Serve's own (back pressure, no replica) are mapped by type, never by message.

Errors cross the ingress -> model-replica hop as plain dicts (`error_to_dict` / `ApiError.from_dict`) yielded
by the replica's stream: the engine's exceptions take custom constructor arguments and would not survive
being pickled into a RayTaskError, and a dict keeps the field name the client must see.
"""
from __future__ import annotations

import asyncio
from typing import Any

import grpc

from workers.errors import (
    CheckpointError,
    EngineUnavailableError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    TokenizerError,
)

# Seconds an HTTP client told 429 (a full model) or 503 (no application behind the proxy) waits before it
# retries: a replica frees seats as streams finish; a starting or draining server changes within seconds.
RETRY_AFTER_S = 1
# gRPC status code name -> (HTTP status, OpenAI error type)
_HTTP: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "INTERNAL": (500, "internal_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}


class ApiError(Exception):
    """An error with the status a client should see. `field` names the offending request field, if any."""

    def __init__(self, code: str, message: str, field: str | None = None):
        if code not in _HTTP:
            raise ValueError(f"unknown status code name {code!r}")
        self.code = code
        self.message = message
        self.field = field
        super().__init__(f"{code}: {message}")

    def __reduce__(self):  # keep (code, message, field) through pickling
        return (ApiError, (self.code, self.message, self.field))

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code]

    @property
    def http_status(self) -> int:
        return _HTTP[self.code][0]

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "field": self.field}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ApiError":
        return cls(d["code"], d["message"], d.get("field"))

    @classmethod
    def model_failed(cls, model: str, why: str) -> "ModelFailedError":
        return ModelFailedError("UNAVAILABLE", f"model {model!r} has no replica: {why}")

    def openai_body(self) -> dict[str, Any]:
        """The body OpenAI's API returns for an error (what the `openai` client parses)."""
        status, err_type = _HTTP[self.code]
        code = {
            "UNAUTHENTICATED": "invalid_api_key",
            "NOT_FOUND": "model_not_found" if self.field == "model" else "not_found",
        }.get(self.code, self.code.lower())
        return {"error": {"message": self.message, "type": err_type, "param": self.field, "code": code}}

    def renamed(self, names: dict[str, str]) -> "ApiError":
        """This error with its field named as the client's API names it (e.g. the engine's "logprobs" is a
        chat request's "top_logprobs"); a field under a renamed one ("structured.regex") is renamed too."""
        if not self.field:
            return self
        for old, new in names.items():
            if self.field == old or self.field.startswith(old + ".") or self.field.startswith(old + "["):
                field = new + self.field[len(old):]
                message = self.message
                if message.startswith(self.field):
                    message = field + message[len(self.field):]
                return ApiError(self.code, message, field)
        return self

    # Constructors for the errors the ingress raises itself.
    @classmethod
    def invalid(cls, field: str, message: str) -> "ApiError":
        return cls("INVALID_ARGUMENT", f"{field}: {message}", field)

    @classmethod
    def unknown_model(cls, model: str, known: list[str]) -> "ApiError":
        return cls("NOT_FOUND", f"model {model!r} is not served here (models: {', '.join(sorted(known))})", "model")

    @classmethod
    def unauthenticated(cls, message: str = "missing or invalid API key") -> "ApiError":
        return cls("UNAUTHENTICATED", message)


class ModelFailedError(ApiError):
    """UNAVAILABLE for a model Serve gave up deploying: no replica comes, so a retry goes nowhere either."""

    def __reduce__(self):
        return (ModelFailedError, (self.code, self.message, self.field))


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception met while serving a request to the status a client should see."""
    if isinstance(exc, ApiError):
        return exc
    # The engine's typed errors.
    if isinstance(exc, InvalidRequestError):  # includes PromptTooLongError
        return ApiError("INVALID_ARGUMENT", str(exc), exc.field)
    if isinstance(exc, QueueFullError):
        return ApiError("RESOURCE_EXHAUSTED", str(exc) or "the model's request queue is full; retry later")
    if isinstance(exc, RequestFailedError):  # this request alone failed; its message holds no internals
        return ApiError("INTERNAL", str(exc) or "the request failed")
    if isinstance(exc, EngineUnavailableError):
        return ApiError("UNAVAILABLE", str(exc) or "the model's engine is unavailable")
    if isinstance(exc, (CheckpointError, TokenizerError)):
        return ApiError("UNAVAILABLE", f"the model could not be loaded: {exc}")
    # Ray Serve's: handle back pressure, no replica, a replica that died under the request.
    from ray.exceptions import RayActorError, TaskCancelledError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(exc, BackPressureError):
        return ApiError("RESOURCE_EXHAUSTED", "too many queued requests for this model; retry later")
    if isinstance(exc, (DeploymentUnavailableError, ReplicaUnavailableError, RayActorError)):
        return ApiError("UNAVAILABLE", "the model's replica is unavailable; retry later")
    if isinstance(exc, (asyncio.CancelledError, TaskCancelledError)):
        return ApiError("CANCELLED", "the request was cancelled")
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError on 3.11+
        return ApiError("DEADLINE_EXCEEDED", "the request's deadline passed")
    # A RayTaskError wraps the remote exception; map its cause if it is one of the above.
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        mapped = to_api_error(cause)
        if mapped.code != "INTERNAL":
            return mapped
    # A bug on our side. No traceback to the client (it may hold paths or data); the log has it.
    return ApiError("INTERNAL", f"internal error ({type(exc).__name__})")


def error_to_dict(exc: BaseException) -> dict[str, Any]:
    """What a model replica yields in place of a chunk when the request fails: {"error": {...}}."""
    return {"error": to_api_error(exc).to_dict()}
