"""OpenAI-compatible HTTP API on the Serve HTTP port: /v1/models, /v1/completions, /v1/chat/completions.

The routes are methods of `OpenAIRoutes`, a mixin of the ingress deployment (cluster.ingress), so HTTP and gRPC
share one `Frontend`: the same API keys, validation, tokenization and model handles. Streaming is Server-Sent
Events as OpenAI sends them (`data: {chunk}` ... `data: [DONE]`).

Statuses are precise: 400 (bad request, names the param), 401 (API key), 404 (model), 429 (queue full),
503 (model down), 504 (deadline), in OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
For a streamed request the first chunk is awaited before the response starts, so errors known at admission
(queue full, prompt too long) still get their status; an error after tokens were sent arrives as an SSE event
`data: {"error": {...}}` (which the openai client raises as an APIError).

OpenAI's sampling fields map onto workers.SamplingParams by name (the body fields that are SamplingParams
fields pass through, so a new one needs no edit here); a missing `max_tokens` means "until the context
ends". `n` completions share one prefill and come back as choices (for several prompts, choice
`prompt_index * n + i`). Structured outputs: `response_format` (json_object, json_schema), or vLLM's
`structured_outputs` {json, regex, choice, grammar} / `guided_json` ... extras; tools and `tool_choice` on chat
(cluster.chat_tools). Beyond OpenAI's fields, the vLLM-style extras are accepted (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, prompt_logprobs), e.g. through the openai client's
`extra_body`. OpenAI fields herd does not implement (`UNSUPPORTED_FIELDS`) are refused with 400 naming the
field, never silently dropped; an error names the field as the request named it (`top_logprobs`,
`response_format.json_schema.schema`, `messages[2].role`).

Before a body is read (`EdgeGuard`, an ASGI middleware): the API key is checked (401 for an unauthenticated
request, whose body is never read); then the body is bounded as it arrives (cluster.request_body): 413 over
`limits.max_request_body_bytes` (by its Content-Length, or as a chunked body arrives), 408 when it takes longer
than `limits.request_body_timeout_s`, 429 when `limits.max_slow_request_bodies` others are already arriving
slowly. A 429 carries `Retry-After`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
from http import HTTPStatus
import time
import uuid
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.chat_tools import ChatTools
from cluster.errors import RETRY_AFTER_S, ApiError, to_api_error
from cluster import tracing
from cluster.raw_json import RawJson, dumps, json_array
from cluster.request_body import BodyRefused, GuardedBody, body_too_large
from cluster.request_context import http_request_id, request_scope

# No built-in docs routes: /openapi.json and /docs exist only when the config enables them (see below).
openai_app = FastAPI(title="herd OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
# Paths that need no API key (probes cannot send one).
OPEN_PATHS = ("/health",)
# OpenAI request fields herd does not implement (yet): refused by name, never silently dropped.
UNSUPPORTED_FIELDS = ("functions", "function_call", "prediction", "audio", "modalities",
                      "web_search_options", "reasoning_effort")
# vLLM's structured-output extras -> workers.StructuredOutputs' field (one may be given, or response_format).
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                           "json_object": "json_object"}


@functools.cache
def _sampling_field_names() -> frozenset[str]:
    from dataclasses import fields

    from workers.sampling_params import SamplingParams  # the light module (no torch)

    return frozenset(f.name for f in fields(SamplingParams))


# ---- request bodies ------------------------------------------------------------------------------------
class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept, so UNSUPPORTED_FIELDS can be refused by name
    # Numbers and flags are strict, as OpenAI's are: pydantic would read `"max_tokens": true` as 1, "3" as 3 and
    # `"stream": "yes"` as true. (A float field still takes an integer.)

    model: str
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[StrictFloat] = None
    top_p: Optional[StrictFloat] = None
    n: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    presence_penalty: Optional[StrictFloat] = None
    frequency_penalty: Optional[StrictFloat] = None
    user: Optional[str] = None
    # vLLM-style extras
    top_k: Optional[StrictInt] = None
    min_p: Optional[StrictFloat] = None
    repetition_penalty: Optional[StrictFloat] = None
    ignore_eos: Optional[StrictBool] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    logit_bias: Optional[dict[str, StrictFloat]] = None
    prompt_logprobs: Optional[StrictInt] = None
    # structured outputs
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[dict[str, Any], str]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def sampling(self, logprobs: Optional[int]) -> dict[str, Any]:
        """The workers.SamplingParams dict of this body: every body field named like a SamplingParams field,
        `logprobs` as the route reads it, the structured-output constraint, and max_tokens None (= until the
        context ends) when the body has none."""
        for name in UNSUPPORTED_FIELDS:
            if (self.model_extra or {}).get(name) not in (None, {}, []):
                raise ApiError.invalid(name, f"{name} is not supported by this server")
        d: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name in _sampling_field_names() & set(type(self).model_fields) - {"logprobs", "max_tokens"}:
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if isinstance(d.get("stop"), str):
            d["stop"] = [d["stop"]]
        if logprobs is not None:
            d["logprobs"] = logprobs
        structured = self.structured()
        if structured is not None:
            d["structured"] = structured
        return d

    def structured(self) -> Optional[dict[str, Any]]:
        """workers.StructuredOutputs' dict form from response_format, structured_outputs or guided_* (one)."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind == "json_object":
                given.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise ApiError.invalid("response_format.json_schema.schema", "must be a JSON schema object")
                given.append(("response_format", {"json_schema": spec["schema"]}))
            elif kind != "text":
                raise ApiError.invalid("response_format.type", f"must be 'text', 'json_object' or 'json_schema', "
                                                               f"got {kind!r}")
        if self.structured_outputs:
            so = self.structured_outputs
            unknown = sorted(set(so) - set(STRUCTURED_OUTPUTS_KEYS))
            if unknown:
                raise ApiError.invalid(f"structured_outputs.{unknown[0]}",
                                       f"unknown key (known: {', '.join(STRUCTURED_OUTPUTS_KEYS)})")
            given.append(("structured_outputs", {STRUCTURED_OUTPUTS_KEYS[k]: v for k, v in so.items()
                                                 if v not in (None, False)}))
        for name, kind in GUIDED_FIELDS.items():
            if getattr(self, name) is not None:
                given.append((name, {kind: getattr(self, name)}))
        if len(given) > 1:
            raise ApiError.invalid(given[1][0], f"give one structured output format, not both {given[0][0]} "
                                                f"and {given[1][0]}")
        return given[0][1] if given else None

    def param_names(self) -> dict[str, str]:
        """Engine field -> this body's field, for error messages."""
        return {"structured": self.structured_field_name()}

    def structured_field_name(self) -> str:
        """The body field the structured-output constraint came from (the one `structured()` reads first)."""
        if self.response_format is not None:
            if self.response_format.get("type") == "json_schema":
                return "response_format.json_schema.schema"
            return "response_format"
        for name in ("structured_outputs", *GUIDED_FIELDS):
            if getattr(self, name):
                return name
        return "structured"

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False
    best_of: Optional[StrictInt] = None
    suffix: Optional[str] = None


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[ChatContentPart], None] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    name: Optional[str] = None

    def as_dict(self, index: int) -> dict[str, Any]:
        """The message as workers' chat templates take it: text content, and the tool fields it sets."""
        d: dict[str, Any] = {"role": self.role, "content": self.text(index)}
        for name in ("tool_calls", "tool_call_id", "name"):
            if getattr(self, name) is not None:
                d[name] = getattr(self, name)
        return d

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text":
                raise ApiError.invalid(f"messages[{index}].content", f"content part type {part.type!r} is not supported")
            parts.append(part.text or "")
        return "".join(parts)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None  # accepted: an answer may hold several calls either way

    def param_names(self) -> dict[str, str]:
        names = {**super().param_names(), "logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names


# ---- errors --------------------------------------------------------------------------------------------
def error_response(err: ApiError) -> JSONResponse:
    headers = {"retry-after": str(RETRY_AFTER_S)} if err.code == "RESOURCE_EXHAUSTED" else None
    return JSONResponse(err.openai_body(), status_code=err.http_status, headers=headers)


@openai_app.exception_handler(ApiError)
async def _api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc)


_NESTED_FIELDS = {"role", "content", "type", "text", "include_usage"}


@openai_app.exception_handler(RequestValidationError)
async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # loc is ("body", character position), not a field
        position = first.get("loc", ("body", "?"))[-1]
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        err = ApiError("INVALID_ARGUMENT", f"the request body is not valid JSON: {reason} (at character {position})")
        return error_response(err)
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # The param is the request field (pydantic adds the union member tried, e.g. prompt.str: drop it);
    # list positions stay (messages.0.role).
    field = ".".join(str(p) for p in loc[:1] + [p for p in loc[1:] if isinstance(p, int) or p in _NESTED_FIELDS])
    return error_response(ApiError.invalid(field or "body", first.get("msg", "invalid value")))


def _frontend():
    from ray import serve

    return serve.get_replica_context().servable_object.frontend


@openai_app.exception_handler(BodyRefused)
async def _body_refused_handler(request: Request, exc: BodyRefused) -> JSONResponse:
    return exc.response()


# Starlette's own HTTP errors (an unknown route 404, a wrong method 405, a body FastAPI could not parse 400) in
# the same OpenAI error body as herd's, so a client reads `error.message` whatever refused the request.
@openai_app.exception_handler(StarletteHTTPException)
async def _http_exception_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = HTTPStatus(exc.status_code)
    if status == HTTPStatus.NOT_FOUND:
        return error_response(ApiError("NOT_FOUND", f"no route {request.method} {request.url.path}"))
    if status == HTTPStatus.BAD_REQUEST:   # FastAPI's "There was an error parsing the body"
        return error_response(ApiError.invalid("body", "the request body could not be parsed as JSON (it must be "
                                                       "UTF-8, and not nested too deeply)"))
    body = {"error": {"message": f"{request.method} {request.url.path}: {status.phrase}",
                      "type": "invalid_request_error", "param": None, "code": status.name.lower()}}
    return JSONResponse(body, status_code=status.value, headers=exc.headers)


class EdgeGuard:
    """ASGI middleware run before a route reads its body: API key (401), the body's size and time
    (cluster.request_body: 413, 408, 429). The request's
    prefix-cache salt (per-key isolation) goes to `request.state.cache_salt` for the route. `frontend` is a
    callable giving the ingress's Frontend (the Serve replica's, by default)."""

    def __init__(self, app, frontend=_frontend):
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        frontend = self.frontend()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope.get("headers", [])]
        limits = frontend.limits.cfg
        try:
            salt = frontend.authenticate(headers)
        except ApiError as e:
            return await error_response(e)(scope, receive, send)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        if length is not None and (not length.strip().isdigit() or int(length) > limits.max_request_body_bytes):
            return await body_too_large(limits.max_request_body_bytes).response()(scope, receive, send)
        scope.setdefault("state", {})["cache_salt"] = salt
        # X-Request-Id: the client's, or the one Serve's proxy made; Serve echoes it on the response.
        request_id = http_request_id(headers)
        held = contextlib.nullcontext()
        if request_id:
            try:
                frontend.limits.check_request_id(request_id, field="X-Request-Id")
                # one live request per id on this ingress replica, as for gRPC (409 ALREADY_EXISTS)
                held = frontend.live_request_ids.hold(request_id)
            except ApiError as e:
                return await error_response(e)(scope, receive, send)
        body = GuardedBody(receive, max_bytes=limits.max_request_body_bytes, timeout_s=limits.request_body_timeout_s,
                           slow_after_s=limits.slow_request_body_s, max_slow=limits.max_slow_request_bodies,
                           slow_bodies=frontend.slow_bodies)

        span = tracing.start_request_span(f"{scope.get('method', 'GET')} {scope['path']}", headers)
        tracing.set_attribute(span, "herd.request_id", request_id)
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message.get("status", 200)
            await send(message)

        try:
            with held, request_scope(request_id):
                return await self.app(scope, body.receive, send_status if span is not None else send)
        finally:
            body.close()
            code = status.get("code", 500)
            tracing.set_attribute(span, "http.response.status_code", code)
            tracing.end_span(span, error=f"HTTP {code}" if code >= 400 else None)


openai_app.add_middleware(EdgeGuard)


def _sse(obj: Any) -> str:
    return f"data: {dumps(obj)}\n\n"


def _json_response(obj: Any) -> Response:
    """JSONResponse's body (no ASCII escapes, no NaN), with RawJson parts (cluster.raw_json) spliced in."""
    return Response(dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8"), media_type="application/json")


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class _Completion:
    """One whole (non-streamed) completion, gathered from the chunk stream. Its text is kept as pieces and
    joined once: appending each chunk to one string copied it every time (4.9 s of the ingress's event loop
    for 100,000 chunks)."""
    pieces: list[str] = dataclass_field(default_factory=list)
    token_ids: list[int] = dataclass_field(default_factory=list)
    logprobs: list[dict] = dataclass_field(default_factory=list)
    finish_reason: Optional[str] = None
    tool_calls: Optional[list[dict]] = None
    prompt_logprobs: Optional[list] = None
    completion_tokens: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, chunk: dict) -> None:
        self.pieces.append(chunk["text"])
        self.token_ids += chunk["token_ids"]
        self.logprobs += chunk["logprobs"] or []
        self.prompt_logprobs = chunk.get("prompt_logprobs") or self.prompt_logprobs
        if chunk["finish_reason"] is not None:
            self.finish_reason = chunk["finish_reason"]
            self.tool_calls = chunk.get("tool_calls")
            self.completion_tokens = chunk["completion_tokens"]


class _Usage:
    """Token counts of a request: each prompt counted once, however many completions it has."""

    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = 0
        self._prompts_seen: set[int] = set()

    def add(self, prompt_index: int, chunk: dict) -> None:
        """Count a completion's last chunk."""
        self.completion += chunk["completion_tokens"]
        if prompt_index not in self._prompts_seen:
            self._prompts_seen.add(prompt_index)
            self.prompt += chunk["prompt_tokens"]
            self.cached += chunk["cached_tokens"]

    def body(self) -> dict[str, Any]:
        return _usage(self.prompt, self.completion, self.cached)


async def _drain(stream: AsyncIterator[tuple[int, dict]], n: int) -> tuple[list[_Completion], _Usage]:
    """Every completion of (prompt index, chunk) pairs, in choice order (prompt_index * n + chunk index)."""
    completions: dict[int, _Completion] = {}
    usage = _Usage()
    async for prompt_index, chunk in stream:
        completions.setdefault(prompt_index * n + chunk.get("index", 0), _Completion()).add(chunk)
        if chunk["finish_reason"] is not None:
            usage.add(prompt_index, chunk)
    return [completions[i] for i in sorted(completions)], usage


def _cache_salt(request: Request) -> int:
    return getattr(request.state, "cache_salt", 0) or 0


async def _merge(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """(index, chunk) from several streams as their chunks arrive. An error in any stream ends the merge
    (and, like leaving it early, closes every stream, which aborts their sequences)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[dict]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _first_then_rest(stream: AsyncIterator) -> AsyncIterator:
    """Await the first chunk now (so admission errors raise before a 200 is sent), then replay everything."""
    first = await stream.__anext__()

    async def replay():
        yield first
        async for chunk in stream:
            yield chunk
    return replay()


def _assistant_message(text: str, tool_calls: Optional[list[dict]]) -> dict[str, Any]:
    if tool_calls:
        return {"role": "assistant", "content": text or None, "tool_calls": tool_calls}
    return {"role": "assistant", "content": text}


# ---- routes --------------------------------------------------------------------------------------------
class OpenAIRoutes:
    """Mixin for the ingress deployment; needs `self.frontend` (cluster.ingress.Frontend)."""

    frontend: Any

    @openai_app.get("/health")
    async def http_health(self) -> JSONResponse:
        ready = await self.frontend.all_ready()
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @openai_app.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(self) -> JSONResponse:
        """The API's OpenAPI schema, only where `enable_openapi_docs` is set (off by default)."""
        if not self.frontend.openapi_docs:
            raise ApiError("NOT_FOUND", "not found")
        return JSONResponse(openai_app.openapi())

    @openai_app.get("/docs", include_in_schema=False)
    async def openapi_docs(self):
        from fastapi.openapi.docs import get_swagger_ui_html

        if not self.frontend.openapi_docs:
            raise ApiError("NOT_FOUND", "not found")
        return get_swagger_ui_html(openapi_url="/openapi.json", title=openai_app.title)

    @openai_app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        data = [self._model_card(info) for info in await self.frontend.list_models()]
        return JSONResponse({"object": "list", "data": data})

    @openai_app.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str) -> JSONResponse:
        """OpenAI's GET /v1/models/{model} (`client.models.retrieve`); a name may hold '/'."""
        return JSONResponse(self._model_card(await self.frontend.model_entry(model_id)))

    def _model_card(self, info: dict[str, Any]) -> dict[str, Any]:
        return {"id": info["name"], "object": "model", "created": self.frontend.started_at, "owned_by": "herd",
                "max_model_len": info.get("max_model_len")}

    @openai_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        if body.echo:
            raise ApiError.invalid("echo", "echo is not supported")
        if body.best_of not in (None, 1):
            raise ApiError.invalid("best_of", "only best_of=1 is supported")
        if body.suffix:
            raise ApiError.invalid("suffix", "suffix is not supported")
        try:
            sampling = await self.frontend.check_sampling(body.sampling(body.logprobs))
        except ApiError as e:
            raise e.renamed(body.param_names()) from None
        route = await self.frontend.model(body.model)
        prompts = self._completion_prompts(body.prompt)
        self.frontend.limits.check_prompt_count(len(prompts))
        prompt_ids = [await self.frontend.encode_prompt(route, p, field="prompt") for p in prompts]
        n = body.n or 1
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        salt = _cache_salt(request)
        # Every prompt is in the engine at once (they batch together), each an independent stream.
        streams = [self.frontend.generate(route, ids, sampling, salt) for ids in prompt_ids]

        async def choice(prompt_index: int, completion_index: int, text: str, token_ids, logprobs, finish) -> dict:
            return {"index": prompt_index * n + completion_index, "text": text, "finish_reason": finish,
                    "logprobs": (await self._completion_logprobs(route, token_ids, logprobs)
                                 if body.logprobs is not None else None)}

        if not body.stream:
            outs, usage = await _drain(_merge(streams), n)
            choices = []
            for i, out in enumerate(outs):
                c = await choice(i // n, i % n, out.text, out.token_ids, out.logprobs, out.finish_reason)
                if body.prompt_logprobs is not None:
                    c["prompt_logprobs"] = await self._prompt_logprobs(route, prompt_ids[i // n], out.prompt_logprobs)
                choices.append(c)
            return _json_response({"id": request_id, "object": "text_completion", "created": created,
                                   "model": body.model, "choices": choices, "usage": usage.body()})

        merged = await _first_then_rest(_merge(streams))

        async def events():
            usage = _Usage()
            try:
                async for prompt_index, chunk in merged:
                    c = await choice(prompt_index, chunk.get("index", 0), chunk["text"], chunk["token_ids"],
                                     chunk["logprobs"], chunk["finish_reason"])
                    if chunk.get("prompt_logprobs"):
                        c["prompt_logprobs"] = await self._prompt_logprobs(route, prompt_ids[prompt_index],
                                                                           chunk["prompt_logprobs"])
                    yield _sse({"id": request_id, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [c]})
                    if chunk["finish_reason"] is not None:
                        usage.add(prompt_index, chunk)
                if body.include_usage:
                    yield _sse({"id": request_id, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [], "usage": usage.body()})
            except Exception as e:  # noqa: BLE001 - after the 200: report in-band
                yield _sse(to_api_error(e).openai_body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @openai_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        top = body.top_logprobs if body.top_logprobs is not None else 0
        try:
            tools = await ChatTools.checked(body.tools, body.tool_choice, self.frontend.limits)
            sampling = body.sampling(top if body.logprobs else None)
            sampling = await self.frontend.check_sampling(tools.constrain(sampling))
        except ApiError as e:
            raise e.renamed(body.param_names()) from None
        route = await self.frontend.model(body.model)
        messages = [m.as_dict(i) for i, m in enumerate(body.messages)]
        ids = await self.frontend.encode_chat(route, messages, tools=tools)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        salt = _cache_salt(request)
        stream = tools.parse(self.frontend.generate(route, ids, sampling, salt))
        prompt_logprobs = (lambda lps: self._prompt_logprobs(route, ids, lps)) if body.prompt_logprobs is not None \
            else None

        if not body.stream:
            outs, usage = await _drain(_merge([stream]), 1)
            choices = [{"index": i, "message": _assistant_message(out.text, out.tool_calls),
                        "finish_reason": out.finish_reason,
                        "logprobs": ({"content": await self._chat_logprobs(route, out.token_ids, out.logprobs)}
                                     if body.logprobs else None)}
                       for i, out in enumerate(outs)]
            response = {"id": request_id, "object": "chat.completion", "created": created,
                        "model": body.model, "choices": choices, "usage": usage.body()}
            if prompt_logprobs is not None:
                response["prompt_logprobs"] = await prompt_logprobs(outs[0].prompt_logprobs)
            return _json_response(response)

        stream = await _first_then_rest(stream)

        def chunk_obj(index: int, delta: dict, finish: Optional[str], logprobs=None) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        async def events():
            started: set[int] = set()
            usage = _Usage()
            try:
                async for chunk in stream:
                    index = chunk.get("index", 0)
                    if index not in started:  # each choice opens with the assistant's role
                        started.add(index)
                        first = chunk_obj(index, {"role": "assistant", "content": ""}, None)
                        if prompt_logprobs is not None and chunk.get("prompt_logprobs"):
                            first["prompt_logprobs"] = await prompt_logprobs(chunk["prompt_logprobs"])
                        yield _sse(first)
                    lp = ({"content": await self._chat_logprobs(route, chunk["token_ids"], chunk["logprobs"])}
                          if body.logprobs else None)
                    finish = chunk["finish_reason"]
                    if chunk.get("tool_calls"):  # the calls, then the choice's end
                        if chunk["text"]:
                            yield _sse(chunk_obj(index, {"content": chunk["text"]}, None, lp))
                            lp = None
                        calls = [{"index": k, **call} for k, call in enumerate(chunk["tool_calls"])]
                        yield _sse(chunk_obj(index, {"tool_calls": calls}, None, lp))
                        yield _sse(chunk_obj(index, {}, finish))
                    elif chunk["text"] or finish is None:
                        yield _sse(chunk_obj(index, {"content": chunk["text"]}, finish, lp))
                    else:
                        yield _sse(chunk_obj(index, {}, finish, lp))
                    if finish is not None:
                        usage.add(0, chunk)
                if body.include_usage:
                    yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": body.model, "choices": [], "usage": usage.body()})
            except Exception as e:  # noqa: BLE001 - after the 200: report in-band
                yield _sse(to_api_error(e).openai_body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- helpers -------------------------------------------------------------------------------------
    @staticmethod
    def _completion_prompts(prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ApiError.invalid("prompt", "must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)

    async def _completion_logprobs(self, route, token_ids: list[int], lps: Optional[list[dict]]) -> Optional[dict]:
        """OpenAI's completion logprobs (each list a RawJson when long: cluster.raw_json)."""
        if lps is None:
            return None
        text = functools.partial(self.frontend.token_text, route)
        entries = sum(1 + len(entry["top"]) for entry in lps)
        return {"tokens": await json_array(token_ids, len(token_ids), text),
                "token_logprobs": await json_array(lps, len(lps), lambda entry: entry["logprob"]),
                "top_logprobs": await json_array(lps, entries, lambda entry: {text(t): lp for t, lp in entry["top"]}),
                "text_offset": []}

    async def _prompt_logprobs(self, route, prompt_ids: list[int], lps: Optional[list]) -> Union[list, RawJson, None]:
        """vLLM's shape: per prompt position None (the first) or {token_id: {logprob, decoded_token}} holding the
        prompt's token and the top-N at that position. Written as JSON text, off the event loop when long
        (cluster.raw_json: a 16k-token prompt's top 20 took the loop over a second)."""
        if lps is None:
            return None

        def position(pair) -> Optional[dict]:
            tok, entry = pair
            if entry is None:
                return None
            return {str(t): {"logprob": lp, "decoded_token": self.frontend.token_text(route, t)}
                    for t, lp in [(tok, entry["logprob"])] + [tuple(x) for x in entry["top"]]}

        entries = sum(1 + len(entry["top"]) for entry in lps if entry is not None)
        return await json_array(zip(prompt_ids, lps), entries, position)

    async def _chat_logprobs(self, route, token_ids: list[int], lps: Optional[list[dict]]):
        """OpenAI's logprobs.content (a RawJson when long: cluster.raw_json)."""
        if lps is None:
            return None

        def item(token_id: int, logprob: float) -> dict:
            return {"token": self.frontend.token_text(route, token_id), "logprob": logprob,
                    "bytes": list(self.frontend.token_bytes(route, token_id))}

        def position(pair) -> dict:
            tok, entry = pair
            return {**item(tok, entry["logprob"]), "top_logprobs": [item(t, lp) for t, lp in entry["top"]]}

        entries = sum(1 + len(entry["top"]) for entry in lps)
        return await json_array(zip(token_ids, lps), entries, position)
