"""OpenAI-compatible HTTP API on the Serve HTTP port: /v1/models, /v1/completions, /v1/chat/completions.

The routes are methods of `OpenAIRoutes`, a mixin of the ingress deployment (cluster.ingress), so HTTP and gRPC
share one `Frontend`: the same API keys, validation, tokenization and model handles. Streaming is Server-Sent
Events as OpenAI sends them (`data: {chunk}` ... `data: [DONE]`).

Statuses are precise: 400 (bad request, names the param), 401 (API key), 404 (model), 429 (queue full),
503 (model down), 504 (deadline), in OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
For a streamed request the first chunk is awaited before the response starts, so errors known at admission
(queue full, prompt too long) still get their status; an error after tokens were sent arrives as an SSE event
`data: {"error": {...}}` (which the openai client raises as an APIError).

Beyond OpenAI's fields, the vLLM-style sampling extras are accepted (top_k, min_p, repetition_penalty,
ignore_eos, stop_token_ids), e.g. through the openai client's `extra_body`. OpenAI fields herd does not
implement (`UNSUPPORTED_FIELDS`) are refused with 400 naming the field, never silently dropped.

Before a body is read (`EdgeGuard`, an ASGI middleware): the API key is checked (401 for an unauthenticated
request, whose body is never read) and the body's size is bounded (413 over `limits.max_request_body_bytes`,
by its Content-Length or, for a chunked body, as it arrives). A 429 carries `Retry-After`.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from cluster.errors import ApiError, to_api_error
from cluster import tracing
from cluster.request_context import http_request_id, request_scope

# No built-in docs routes: /openapi.json and /docs exist only when the config enables them (see below).
openai_app = FastAPI(title="herd OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
# Seconds a client told "429" should wait before trying again (a replica frees seats as streams finish).
RETRY_AFTER_S = 1
# Paths that need no API key (probes cannot send one).
OPEN_PATHS = ("/health",)
# OpenAI request fields herd does not implement (yet): refused by name, never silently dropped.
UNSUPPORTED_FIELDS = ("response_format", "tools", "tool_choice", "functions", "function_call",
                      "parallel_tool_calls", "logit_bias", "prediction", "audio", "modalities",
                      "web_search_options", "reasoning_effort")


# ---- request bodies ------------------------------------------------------------------------------------
class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")  # kept, so UNSUPPORTED_FIELDS can be refused by name

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # vLLM-style extras
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None

    def sampling(self, logprobs: Optional[int]) -> dict[str, Any]:
        for name in UNSUPPORTED_FIELDS:
            if (self.model_extra or {}).get(name) not in (None, {}, []):
                raise ApiError.invalid(name, f"{name} is not supported by this server")
        if self.n != 1:
            raise ApiError.invalid("n", "only n=1 is supported")
        d: dict[str, Any] = {}
        for name in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                     "top_k", "min_p", "repetition_penalty", "ignore_eos", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if self.stop is not None:
            d["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if logprobs is not None:
            d["logprobs"] = logprobs
        return d

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[ChatContentPart], None] = None

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
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


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
    loc = [p for p in first.get("loc", ()) if p != "body"]
    # The param is the request field (pydantic adds the union member tried, e.g. prompt.str: drop it);
    # list positions stay (messages.0.role).
    field = ".".join(str(p) for p in loc[:1] + [p for p in loc[1:] if isinstance(p, int) or p in _NESTED_FIELDS])
    return error_response(ApiError.invalid(field or "body", first.get("msg", "invalid value")))


def _frontend():
    from ray import serve

    return serve.get_replica_context().servable_object.frontend


class BodyTooLarge(HTTPException):
    """Raised while a body arrives past the limit (an HTTPException, so FastAPI's body parsing lets it through
    to the handler below instead of calling it a parse error)."""

    def __init__(self, limit: int):
        super().__init__(status_code=413)
        self.limit = limit

    def response(self) -> JSONResponse:
        err = ApiError.invalid("body", f"request body is over this server's limit of {self.limit} bytes "
                                       "(limits.max_request_body_bytes)")
        return JSONResponse(err.openai_body(), status_code=413)


@openai_app.exception_handler(BodyTooLarge)
async def _body_too_large_handler(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return exc.response()


class EdgeGuard:
    """ASGI middleware run before a route reads its body: API key (401), body size (413). The request's
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
        limit = frontend.limits.cfg.max_request_body_bytes
        try:
            salt = frontend.authenticate(headers)
        except ApiError as e:
            return await error_response(e)(scope, receive, send)
        length = next((v for k, v in headers if k.lower() == "content-length"), None)
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            return await BodyTooLarge(limit).response()(scope, receive, send)
        scope.setdefault("state", {})["cache_salt"] = salt
        # X-Request-Id: the client's, or the one Serve's proxy made; Serve echoes it on the response.
        request_id = http_request_id(headers)
        if request_id:
            try:
                frontend.limits.check_request_id(request_id, field="X-Request-Id")
            except ApiError as e:
                return await error_response(e)(scope, receive, send)
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        span = tracing.start_request_span(f"{scope.get('method', 'GET')} {scope['path']}", headers)
        tracing.set_attribute(span, "herd.request_id", request_id)
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message.get("status", 200)
            await send(message)

        try:
            with request_scope(request_id):
                return await self.app(scope, bounded_receive, send_status if span is not None else send)
        finally:
            code = status.get("code", 500)
            tracing.set_attribute(span, "http.response.status_code", code)
            tracing.end_span(span, error=f"HTTP {code}" if code >= 400 else None)


openai_app.add_middleware(EdgeGuard)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class _Completion:
    """A whole (non-streamed) generation, gathered from the chunk stream."""
    text: str
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: Optional[str]
    usage: tuple[int, int, int]  # prompt, completion, cached tokens

    @classmethod
    async def drain(cls, stream: AsyncIterator[dict]) -> "_Completion":
        text, token_ids, logprobs, finish, usage = [], [], [], None, (0, 0, 0)
        async for chunk in stream:
            text.append(chunk["text"])
            token_ids += chunk["token_ids"]
            logprobs += chunk["logprobs"] or []
            if chunk["finish_reason"] is not None:
                finish = chunk["finish_reason"]
                usage = (chunk["prompt_tokens"], chunk["completion_tokens"], chunk["cached_tokens"])
        return cls("".join(text), token_ids, logprobs, finish, usage)


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
        data = []
        for info in await self.frontend.list_models():
            data.append({"id": info["name"], "object": "model", "created": self.frontend.started_at,
                         "owned_by": "herd", "max_model_len": info.get("max_model_len")})
        return JSONResponse({"object": "list", "data": data})

    @openai_app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        if body.echo:
            raise ApiError.invalid("echo", "echo is not supported")
        if body.best_of not in (None, 1):
            raise ApiError.invalid("best_of", "only best_of=1 is supported")
        if body.suffix:
            raise ApiError.invalid("suffix", "suffix is not supported")
        sampling = self.frontend.check_sampling(body.sampling(body.logprobs))
        route = await self.frontend.model(body.model)
        prompts = self._completion_prompts(body.prompt)
        self.frontend.limits.check_prompt_count(len(prompts))
        prompt_ids = [await self.frontend.encode_prompt(route, p, field="prompt") for p in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        salt = _cache_salt(request)
        # Every prompt is in the engine at once (they batch together), each an independent stream.
        streams = [self.frontend.generate(route, ids, sampling, salt) for ids in prompt_ids]

        if not body.stream:
            outs = await asyncio.gather(*(_Completion.drain(s) for s in streams))
            usage = [sum(col) for col in zip(*(out.usage for out in outs))]
            choices = [{"index": index, "text": out.text, "finish_reason": out.finish_reason,
                        "logprobs": (self._completion_logprobs(route, out.token_ids, out.logprobs)
                                     if body.logprobs is not None else None)}
                       for index, out in enumerate(outs)]
            return JSONResponse({"id": request_id, "object": "text_completion", "created": created, "model": body.model,
                                 "choices": choices, "usage": _usage(*usage)})

        merged = await _first_then_rest(_merge(streams))

        async def events():
            usage = [0, 0, 0]
            try:
                async for index, chunk in merged:
                    lp = (self._completion_logprobs(route, chunk["token_ids"], chunk["logprobs"])
                          if body.logprobs is not None else None)
                    yield _sse({"id": request_id, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [{"index": index, "text": chunk["text"],
                                                                  "logprobs": lp,
                                                                  "finish_reason": chunk["finish_reason"]}]})
                    if chunk["finish_reason"] is not None:
                        usage[0] += chunk["prompt_tokens"]
                        usage[1] += chunk["completion_tokens"]
                        usage[2] += chunk["cached_tokens"]
                if body.include_usage:
                    yield _sse({"id": request_id, "object": "text_completion", "created": created,
                                "model": body.model, "choices": [], "usage": _usage(*usage)})
            except Exception as e:  # noqa: BLE001 - after the 200: report in-band
                yield _sse(to_api_error(e).openai_body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @openai_app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        top = body.top_logprobs if body.top_logprobs is not None else 0
        sampling = self.frontend.check_sampling(body.sampling(top if body.logprobs else None))
        route = await self.frontend.model(body.model)
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(body.messages)]
        ids = await self.frontend.encode_chat(route, messages)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        salt = _cache_salt(request)
        if not body.stream:
            out = await _Completion.drain(self.frontend.generate(route, ids, sampling, salt))
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                      "finish_reason": out.finish_reason,
                      "logprobs": ({"content": self._chat_logprobs(route, out.token_ids, out.logprobs)}
                                   if body.logprobs else None)}
            return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                                 "model": body.model, "choices": [choice], "usage": _usage(*out.usage)})

        stream = await _first_then_rest(self.frontend.generate(route, ids, sampling, salt))

        def chunk_obj(delta: dict, finish: Optional[str], logprobs=None) -> dict:
            return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": body.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        async def events():
            yield _sse(chunk_obj({"role": "assistant", "content": ""}, None))
            try:
                async for chunk in stream:
                    lp = ({"content": self._chat_logprobs(route, chunk["token_ids"], chunk["logprobs"])}
                          if body.logprobs else None)
                    delta = {"content": chunk["text"]} if chunk["text"] or chunk["finish_reason"] is None else {}
                    yield _sse(chunk_obj(delta, chunk["finish_reason"], lp))
                    if chunk["finish_reason"] is not None and body.include_usage:
                        yield _sse({"id": request_id, "object": "chat.completion.chunk", "created": created,
                                    "model": body.model, "choices": [],
                                    "usage": _usage(chunk["prompt_tokens"], chunk["completion_tokens"],
                                                    chunk["cached_tokens"])})
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

    def _completion_logprobs(self, route, token_ids: list[int], lps: Optional[list[dict]]) -> Optional[dict]:
        if lps is None:
            return None
        tokens = [self.frontend.token_text(route, t) for t in token_ids]
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in lps],
                "top_logprobs": [{self.frontend.token_text(route, t): lp for t, lp in e["top"]} for e in lps],
                "text_offset": []}

    def _chat_logprobs(self, route, token_ids: list[int], lps: Optional[list[dict]]) -> Optional[list[dict]]:
        if lps is None:
            return None
        def item(token_id: int, logprob: float) -> dict:
            return {"token": self.frontend.token_text(route, token_id), "logprob": logprob,
                    "bytes": list(self.frontend.token_bytes(route, token_id))}

        return [{**item(tok, entry["logprob"]), "top_logprobs": [item(t, lp) for t, lp in entry["top"]]}
                for tok, entry in zip(token_ids, lps)]
