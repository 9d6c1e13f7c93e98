"""The ingress deployment: herd's gRPC API (herd.v1.Inference + grpc.health.v1.Health) and the OpenAI HTTP API.

Every request is authenticated, validated against the configured limits (cluster.limits) and tokenized here,
once; the model deployment's handle is then called with token ids (`generate_stream(prompt_token_ids,
sampling, request_id, cache_salt=...)`, see cluster.deployment), so the prefix-cache router hashes the very
tokens (under the very salt) the engine's KV cache will hold.

`Frontend` is the protocol-free core (auth, model lookup, tokenization, validation, streaming from a model
replica, readiness) shared by the gRPC methods below and the OpenAI routes (cluster.openai_http).

Status codes: a failure becomes a `cluster.errors.ApiError`, whose code and details go on the Serve gRPC
context. Unary methods then return an empty message (the proxy sends the status set on the context);
streaming methods raise `StatusSet`, because Serve applies the context only with a yielded message or a raised
exception (an exception without a code would reach the client as INTERNAL with a traceback); see
cluster.grpc_status for why that exception, and its log line, are kept cheap. The client sees exactly the
status set here. Client cancellation and deadlines: the proxy cancels this
replica's call, whose `finally` cancels the model replica's stream, which aborts the sequence in the engine.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Iterable, TypeVar

from ray import serve

from cluster.app_name import model_application
from cluster.chat_tools import ChatTools
from cluster.errors import ApiError, ModelFailedError, to_api_error
from cluster.grpc_status import StatusSet, install_status_log_filter
from cluster.limits import InputLimits, LiveRequestIds
from cluster.local_ray import DEFAULT_SERVE_TRANSPORT
from cluster import tracing
from cluster.unavailable_replicas import note_actor_unavailable, note_unavailable
from cluster.request_context import (REQUEST_ID_HEADER, current_request_id, grpc_request_id,
                                     install_request_id_logging, outgoing_context, set_request_id)
from cluster.off_loop import off_loop
from cluster.openai_http import OpenAIRoutes, openai_app
from cluster.replica_shutdown import on_replica_shutdown
from cluster.request_body import SlowBodies
from cluster.pb import inference_pb2 as pb
from cluster.proto_convert import (messages_from_proto, responses_from_chunk, sampling_from_proto,
                                   tool_choice_from_proto, tools_from_proto)
from workers.gc_freeze import freeze_startup_objects

log = logging.getLogger(f"herd.{__name__}")

# How long a readiness answer (from the Serve controller) is reused.
READINESS_TTL_S = 1.0
# How often a call waiting for a model's replica looks whether Serve gave up deploying the model.
AVAILABILITY_RECHECK_S = 1.0
T = TypeVar("T")
# Service name that means "the whole API" besides "" (grpc.health.v1 convention).
SERVICE_NAME = "herd.v1.Inference"
# A request whose replica died before its first token is sent again this many times.
RETRIES_BEFORE_FIRST_TOKEN = 1


def as_own_serve_request(call):
    """`call()` (a handle's .remote()) as a Serve request of its own. Serve tags a call made while serving
    a request with that request's internal id, and two calls in flight under one id (the prompts of one
    /v1/completions request) get mixed up in its router and replica, which stall. A fresh id per call keeps
    them apart; leaving early still cancels each (Frontend.generate cancels its stream itself)."""
    def run():
        from ray.serve import context as serve_context  # the request context is internal to Serve

        current = serve_context._get_serve_request_context()
        serve_context._serve_request_context.set(dataclasses.replace(
            current, _internal_request_id=uuid.uuid4().hex,
            # herd's request id as Serve's too: the model replica's Serve log lines show it
            request_id=current_request_id() or current.request_id))
        return call()
    return contextvars.copy_context().run(run)


def _chained(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """`first` (None: `rest` had nothing), then the rest of `rest`."""
    async def chain():
        if first is None:
            return
        yield first
        async for item in rest:
            yield item
    return chain()


# ---- authentication ------------------------------------------------------------------------------------
class ApiKeyAuth:
    """API keys from `authorization: Bearer KEY` or `x-api-key: KEY`. Keys are kept only as SHA-256 digests and
    compared in constant time against every configured key (no early exit, no length leak); never logged.

    Keys come inline or from a file (one per line, `#` comments; a mounted Kubernetes Secret), which is re-read
    when its modification time changes (checked at most every KEY_FILE_CHECK_S), so keys rotate without a
    restart. A file that cannot be read keeps the keys last read (and fails closed if there were none)."""

    KEY_FILE_CHECK_S = 5.0

    def __init__(self, keys: Iterable[str] = (), key_file: str | None = None):
        self._digests = self._digest_all(keys)
        self._key_file = key_file
        self._file_mtime: float | None = None
        self._file_checked = 0.0
        if key_file is not None:
            self._reload_file(force=True)

    @staticmethod
    def _digest_all(keys: Iterable[str]) -> list[bytes]:
        return [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def _reload_file(self, force: bool = False) -> None:
        import os
        from workers.errors import HerdError

        now = time.monotonic()
        if not force and now - self._file_checked < self.KEY_FILE_CHECK_S:
            return
        self._file_checked = now
        try:
            mtime = os.stat(self._key_file).st_mtime
            if mtime == self._file_mtime:
                return
            from cluster.config import ClusterConfig  # one parser of the key file format

            keys = ClusterConfig.model_construct(api_keys_file=self._key_file).resolved_api_keys()
        except (OSError, HerdError):
            if force:
                raise
            log.warning("API key file unreadable; keeping the keys read before")
            return
        self._digests, self._file_mtime = self._digest_all(keys), mtime
        log.info("API keys loaded from file (%d keys)", len(self._digests))

    @property
    def enabled(self) -> bool:
        return bool(self._digests) or self._key_file is not None

    @staticmethod
    def presented_key(headers: Iterable[tuple[str, Any]]) -> str | None:
        key = None
        for name, value in headers:
            if not isinstance(value, str):
                continue  # binary metadata
            name = name.lower()
            if name == "authorization":
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    key = token.strip()
            elif name == "x-api-key" and value.strip():
                key = value.strip()
        return key

    def check(self, headers: Iterable[tuple[str, Any]]) -> bytes | None:
        """Raise UNAUTHENTICATED unless the headers carry a configured key; return that key's SHA-256 digest
        (None when authentication is off), which stands for the tenant in per-key cache isolation."""
        if self._key_file is not None:
            self._reload_file()
        if not self.enabled:
            return None
        key = self.presented_key(headers)
        if key is None:
            raise ApiError.unauthenticated("missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'")
        digest = hashlib.sha256(key.encode()).digest()
        ok = False
        for ref in self._digests:
            ok |= hmac.compare_digest(digest, ref)
        if not ok:
            raise ApiError.unauthenticated("invalid API key")
        return digest


# ---- protocol-free core --------------------------------------------------------------------------------
@dataclass
class ModelRoute:
    name: str
    handle: Any                 # DeploymentHandle of the model's deployment
    spec: dict[str, Any]        # name, path, deployment, tensor/pipeline_parallel_size, autoscaling
    tokenizer: Any = None       # workers.Tokenizer, or None (token-id prompts only)
    info: dict[str, Any] | None = None  # from a replica: max_model_len, vocab_size, block_size
    info_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    application: str = ""       # the Serve application of its deployment ("": the ingress's own)


@dataclass(frozen=True)
class ModelState:
    """A model as the ingress knows it from Serve's controller (Frontend.model_states)."""
    ready: bool                     # at least one RUNNING replica
    failure: str | None = None      # why it has none while Serve gave up deploying it (DEPLOY_FAILED)


def cache_salt_for(key_digest: bytes | None) -> int:
    """The prefix-cache salt of a tenant (an API key's digest): a non-zero 64-bit number that roots its block
    hash chain, so its blocks never match another tenant's (0 = shared cache)."""
    if key_digest is None:
        return 0
    salt = int.from_bytes(hashlib.sha256(b"herd-prefix-cache-salt:" + key_digest).digest()[:8], "little")
    return salt or 1


def model_handles(specs: dict[str, dict[str, Any]], own_app: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Each model's deployment handle, looked up by name, and its Serve application: the ingress's own, or the
    model's own (cluster.app.build_model_app). The model's application may not run yet (Serve deploys a
    serveConfigV2's applications side by side): a call waits for its replicas as through a bound handle."""
    applications = {name: model_application(own_app, name) if spec.get("own_application") else own_app
                    for name, spec in specs.items()}
    handles = {name: serve.get_deployment_handle(spec["deployment"], applications[name], _check_exists=False)
               for name, spec in specs.items()}
    return handles, applications


class Frontend:
    def __init__(self, handles: dict[str, Any], specs: dict[str, dict[str, Any]], api_keys: Iterable[str] = (),
                 api_keys_file: str | None = None, settings: dict[str, Any] | None = None,
                 applications: dict[str, str] | None = None):
        """applications: the Serve application of each model's deployment (default: the ingress's own)."""
        settings = dict(settings or {})
        applications = applications or {}
        self.routes = {name: ModelRoute(name, handles[name], specs[name],
                                        application=applications.get(name, "")) for name in specs}
        self.auth = ApiKeyAuth(api_keys, api_keys_file)
        self.limits = InputLimits(settings.get("limits"))
        self.isolate_prefix_cache = settings.get("prefix_cache_isolation", "none") == "per_key"
        self.openapi_docs = bool(settings.get("enable_openapi_docs", False))
        # Serve's gRPC between replicas ("grpc") or Ray actor calls ("ray") for the hop to the model replicas.
        self.by_reference = settings.get("serve_transport", DEFAULT_SERVE_TRANSPORT) != "grpc"
        self.live_request_ids = LiveRequestIds()
        self.health_watchers = 0
        self.slow_bodies = SlowBodies()   # HTTP bodies arriving slowly (cluster.request_body)
        self.stopping = asyncio.Event()   # Serve has begun to shut this replica down (cluster.replica_shutdown)
        self.started_at = int(time.time())
        self._states: tuple[float, dict[str, ModelState]] | None = None
        self._states_lock = asyncio.Lock()
        self._renewing: asyncio.Future | None = None   # a background model_states() (check_available)

    async def load_tokenizers(self) -> None:
        from workers import Tokenizer

        for route in self.routes.values():
            try:
                route.tokenizer = await asyncio.to_thread(Tokenizer.from_pretrained_dir, route.spec["path"])
            except Exception as e:  # noqa: BLE001 - a model without a tokenizer still serves token ids
                log.warning("model %s: no usable tokenizer at the ingress (%s); only token-id prompts", route.name, e)

    async def warm_up(self) -> None:
        """Ask every model for its info in the background, which also sets up the ingress's handle to it
        (Serve's first call through a handle waits ~1 s for the replica list): the first requests after a
        deploy, a burst included, then meet a ready handle. A model not up yet is simply asked again later."""
        async def one(route: ModelRoute) -> None:
            try:
                await self.info(route)
            except Exception:  # noqa: BLE001 - the first request will ask (and report) again
                log.info("model %s: not ready at ingress start; its info is fetched on first use", route.name)
        await asyncio.gather(*(one(r) for r in self.routes.values()))

    # -- lookups and validation
    def authenticate(self, headers: Iterable[tuple[str, Any]]) -> int:
        """Check the API key; return the request's prefix-cache salt (0 unless per-key isolation is on)."""
        digest = self.auth.check(headers)
        return cache_salt_for(digest) if self.isolate_prefix_cache else 0

    async def model(self, name: str) -> ModelRoute:
        route = self.routes.get(name)
        if route is None:
            if not name:
                raise ApiError.invalid("model", "must be set")
            raise ApiError.unknown_model(name, list(self.routes))
        return route

    async def info(self, route: ModelRoute) -> dict[str, Any]:
        """max_model_len / vocab_size / block_size as a replica's engine reports them: kept once a replica of
        the deployed version answers. During a rolling update with a surge this ingress can start while only
        the old replicas run (another max_model_len, even another checkpoint): their answer serves the call
        that asked, and the next call asks again."""
        if route.info is not None:
            return route.info
        async with route.info_lock:
            if route.info is None:
                async def ask() -> dict[str, Any]:
                    return await route.handle.model_info.remote()
                try:
                    info = await self._unless_failed(route, ask())
                except Exception as e:  # noqa: BLE001
                    raise to_api_error(e) from None
                if info.get("version") != route.spec.get("version"):
                    return info
                route.info = info
        return route.info

    async def check_sampling(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """Limits, then workers.SamplingParams' own checks, then the structured-output constraint's (a bad
        schema, regex or grammar is refused here, before anything is queued; a large one is checked off the
        event loop: a 300 KB schema takes llguidance ~0.5 s)."""
        from workers.errors import InvalidRequestError
        from workers.sampling_params import SamplingParams  # the light module: the ingress never imports torch
        from workers.structured_output import validate_structured

        self.limits.check_sampling(sampling)
        try:
            params = SamplingParams.from_dict(sampling)
            if params.structured is not None:
                chars = params.structured.chars()
                self.limits.check_structured_chars(chars)
                await off_loop(chars, validate_structured, params.structured)
        except InvalidRequestError as e:
            raise to_api_error(e) from None
        except (TypeError, ValueError) as e:  # a wrong type that the dataclass itself refused
            raise ApiError.invalid("sampling", str(e)) from None
        return sampling

    async def encode_prompt(self, route: ModelRoute, prompt: str | list[int], field: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError.invalid(field, "must not be empty")
            self.limits.check_prompt_text(prompt, field)
            ids = await off_loop(len(prompt), self.tokenizer_for(route, field).encode, prompt, bos=True)
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise ApiError.invalid(field, "must not be empty")
        await self.check_prompt(route, ids, field)
        return ids

    async def encode_chat(self, route: ModelRoute, messages: list[dict[str, Any]], field: str = "messages",
                          tools: ChatTools | None = None) -> list[int]:
        """Messages (and tools) rendered with the model's chat template, then tokenized. The template's
        validator names the offending message and field (e.g. messages[2].role)."""
        from workers.errors import InvalidRequestError

        if not messages:
            raise ApiError.invalid(field, "must not be empty")
        tools = tools or ChatTools.none()
        size = self.limits.check_messages(messages, field) + tools.chars
        tok = self.tokenizer_for(route, field)
        try:
            ids = await off_loop(size, tok.apply_chat_template, messages, add_generation_prompt=True,
                                 tools=tools.tools)
        except InvalidRequestError as e:
            raise to_api_error(e) from None
        except Exception as e:  # noqa: BLE001 - the tokenizer's complaint about the messages
            raise ApiError.invalid(field, str(e)) from None
        await self.check_prompt(route, ids, field)
        return ids

    async def check_prompt(self, route: ModelRoute, ids: list[int], field: str) -> None:
        self.limits.check_prompt_tokens(len(ids), field)
        info = await self.info(route)
        vocab, max_len = info["vocab_size"], info["max_model_len"]
        for t in ids:
            if not 0 <= t < vocab:
                raise ApiError.invalid(field, f"token id {t} is outside the vocabulary [0, {vocab})")
        if len(ids) >= max_len:
            raise ApiError.invalid(field, f"prompt has {len(ids)} tokens but max_model_len is {max_len} "
                                          "(the prompt must leave room for at least one generated token)")

    @staticmethod
    def tokenizer_for(route: ModelRoute, field: str):
        if route.tokenizer is None:
            raise ApiError.invalid(field, f"model {route.name!r} has no tokenizer; send token ids")
        return route.tokenizer

    def token_text(self, route: ModelRoute, token_id: int) -> str:
        return route.tokenizer.token_text(token_id) if route.tokenizer is not None else ""

    def token_bytes(self, route: ModelRoute, token_id: int) -> bytes:
        """Raw bytes of one token (a token may hold part of a UTF-8 character, which text cannot show)."""
        return route.tokenizer.token_bytes(token_id) if route.tokenizer is not None else b""

    # -- generation
    async def generate(self, route: ModelRoute, ids: list[int], sampling: dict[str, Any],
                       cache_salt: int = 0) -> AsyncIterator[dict]:
        """Stream chunk dicts from a model replica; raises ApiError. Leaving early cancels the replica's stream
        (and so aborts the sequence and frees its KV blocks).

        A request whose replica turns out to be unavailable (it died, its engine is down) before any token
        was streamed is sent once more: nothing reached the client yet, so a replica restart under load costs
        clients nothing before their first token. The router leaves the replica that failed out of that
        second choice when another one is there (cluster.unavailable_replicas)."""
        for attempt in range(1 + RETRIES_BEFORE_FIRST_TOKEN):
            streamed = False
            try:
                async for chunk in self._generate_once(route, ids, sampling, cache_salt):
                    streamed = True
                    yield chunk
                return
            except ApiError as e:
                if streamed or e.code != "UNAVAILABLE" or isinstance(e, ModelFailedError) \
                        or attempt == RETRIES_BEFORE_FIRST_TOKEN:
                    raise
                log.warning("model %s: replica unavailable before the first token (%s); retrying once",
                            route.name, e.message)

    async def _generate_once(self, route: ModelRoute, ids: list[int], sampling: dict[str, Any],
                             cache_salt: int) -> AsyncIterator[dict]:
        """One try: the replica's chunks until each of the request's `n` completions has finished."""
        self.check_available(route)   # before the call: Serve's handle would queue it for nothing
        engine_request_id = uuid.uuid4().hex
        unfinished = int(sampling.get("n", 1))
        context = outgoing_context()  # the request id and trace context travel with the call (or None)
        # Every argument positional: Serve's gRPC transport (Ray 2.60) fails a streaming call that has keyword
        # arguments (the caller waits on a rejection handshake that never comes).
        handle = route.handle.options(stream=True, _by_reference=self.by_reference)
        gen = as_own_serve_request(lambda: handle.generate_stream.remote(
            ids, sampling, engine_request_id, cache_salt, context))
        done = False
        try:
            chunks = aiter(gen)
            first = await self._unless_failed(route, anext(chunks, None))
            async for chunk in _chained(first, chunks):
                if "error" in chunk:
                    done = True
                    if chunk["error"]["code"] == "UNAVAILABLE":  # its engine is down: the retry goes elsewhere
                        note_actor_unavailable(chunk["error"].get("actor_id"))
                    raise ApiError.from_dict(chunk["error"])
                yield chunk
                if chunk["finish_reason"] is not None:
                    unfinished -= 1
                    if unfinished == 0:
                        done = True
                        return
            done = True
            raise ApiError("UNAVAILABLE", "the model's stream ended early")
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001 - Serve/Ray errors: back pressure, replica died, ...
            done = True
            note_unavailable(e)  # a retry's routing leaves that replica out (cluster.unavailable_replicas)
            raise to_api_error(e) from None
        finally:
            if not done:
                gen.cancel()

    # -- readiness
    async def model_states(self, max_age_s: float = READINESS_TTL_S) -> dict[str, ModelState]:
        """model name -> its state, as Serve's controller saw it at most `max_age_s` before this call. Callers
        that waited while another one asked the controller take that answer (one call at a time)."""
        asked_at = time.monotonic()
        async with self._states_lock:
            if self._states is None or asked_at - self._states[0] > max_age_s:
                taken_at = time.monotonic()
                try:
                    states = await asyncio.to_thread(self._states_from_controller)
                except Exception:  # noqa: BLE001 - the controller is unreachable: nothing is known to be ready
                    log.warning("readiness: Serve status unavailable", exc_info=True)
                    states = {name: ModelState(ready=False) for name in self.routes}
                self._states = (taken_at, states)
            return dict(self._states[1])

    async def readiness(self) -> dict[str, bool]:
        """model name -> has at least one RUNNING replica (weights loaded, health checks passing). A "not ready"
        is asked anew: the cached one may be from before a model's replica started (calls waiting for it
        refresh the states every AVAILABILITY_RECHECK_S), and a probe must not see it."""
        states = await self.model_states()
        if not all(state.ready for state in states.values()):
            states = await self.model_states(max_age_s=0.0)
        return {name: state.ready for name, state in states.items()}

    async def _unless_failed(self, route: ModelRoute, call: Awaitable[T]) -> T:
        """`call`'s result, or UNAVAILABLE as soon as the model is known to have failed (check_available), before
        or while it waits: a call waits for a replica until its deadline, and Serve brings none to a deployment
        it gave up on."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                self.check_available(route)
                done, _ = await asyncio.wait({task}, timeout=AVAILABILITY_RECHECK_S)
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()

    def check_available(self, route: ModelRoute) -> None:
        """UNAVAILABLE at once for a model that has no replica because Serve gave up deploying it (a bad path, a
        checkpoint that does not load): a call to its handle would wait for a replica until its deadline. A
        model still starting, or scaled to zero, is waited for as before.

        From what Serve's controller last said, never waiting for it: requests flow while the controller is
        slow or away (it restarts; a test pauses it), as they do through Serve's own handles. A stale answer
        is renewed in the background."""
        self._renew_states_soon()
        state = self._states[1].get(route.name) if self._states is not None else None
        if state is not None and state.failure is not None:
            raise ApiError.model_failed(route.name, state.failure)

    def _renew_states_soon(self) -> None:
        stale = self._states is None or time.monotonic() - self._states[0] > READINESS_TTL_S
        if stale and self._renewing is None:
            self._renewing = asyncio.ensure_future(self.model_states())
            self._renewing.add_done_callback(lambda _: setattr(self, "_renewing", None))

    def _states_from_controller(self) -> dict[str, ModelState]:
        from cluster.status import serve_details, status_name

        own_app = serve.get_replica_context().app_name
        # The controller's plain dict, not serve.status(): asked every READINESS_TTL_S under load, that one took
        # 6% of this process's busy samples (py-spy, a sustained overload) with the GIL held (serve_details).
        applications = serve_details().get("applications") or {}
        states = {}
        for name, route in self.routes.items():
            app = applications.get(route.application or own_app) or {}
            d = (app.get("deployments") or {}).get(route.spec["deployment"])
            running = sum(status_name(r.get("state")) == "RUNNING" for r in d.get("replicas") or ()) if d else 0
            failure = None
            # DEPLOY_FAILED only: Serve stopped trying. UNHEALTHY (a replica died) is a replacement under way,
            # which a call waits for (and a retry before the first token lands on).
            if d is not None and not running and status_name(d.get("status")) == "DEPLOY_FAILED":
                # The client learns that it failed, not why (Serve's message is a traceback with the server's
                # paths): `herd status` and the replica's log say why.
                failure = "its deployment failed (DEPLOY_FAILED; `herd status` says why)"
            states[name] = ModelState(ready=running > 0, failure=failure)
        return states

    async def all_ready(self) -> bool:
        return all((await self.readiness()).values())

    async def health(self, service: str) -> bool | None:
        """SERVING? for a grpc.health.v1 service name: "" or herd.v1.Inference = every model; a model name =
        that model; anything else -> None (unknown)."""
        ready = await self.readiness()
        if service in ("", SERVICE_NAME):
            return all(ready.values())
        return ready.get(service)

    async def list_models(self) -> list[dict[str, Any]]:
        return [await self.model_entry(name) for name in self.routes]

    async def model_entry(self, name: str) -> dict[str, Any]:
        """What ListModels / GET /v1/models say of model `name` (NOT_FOUND when it is not served)."""
        route = await self.model(name)
        info = dict(route.spec)
        try:  # a model still loading is listed from its config alone
            info.update(await asyncio.wait_for(self.info(route), timeout=2.0))
        except Exception:  # noqa: BLE001
            pass
        info["name"] = name
        return info


# ---- gRPC <-> Frontend ---------------------------------------------------------------------------------
def _set_status(grpc_context, err: ApiError) -> StatusSet:
    """Put the error's status on the Serve gRPC context; a streaming method then raises the returned
    StatusSet (a unary one returns an empty message), so the client gets exactly this status."""
    grpc_context.set_code(err.grpc_code)
    grpc_context.set_details(err.message)
    return StatusSet(err.message, err.grpc_code.name)


@serve.ingress(openai_app)
class InferenceIngress(OpenAIRoutes):
    """gRPC methods are named as the RPCs (Serve's proxy dispatches by name) and take `grpc_context`."""

    async def __init__(self, models: dict[str, Any] | None, specs: dict[str, dict[str, Any]], api_keys: list[str],
                       api_keys_file: str | None = None, settings: dict[str, Any] | None = None):
        """models: each model's bound deployment handle (cluster.app.build_app), or None: looked up by name
        (cluster.app.build_ingress_app, each model an application of its own)."""
        own_app = serve.get_replica_context().app_name
        if models is None:
            models, applications = model_handles(specs, own_app)
        else:
            applications = {name: own_app for name in specs}
        self.frontend = Frontend(models, specs, api_keys, api_keys_file, settings, applications)
        install_status_log_filter()  # refusals log one line, not a traceback each (cluster.grpc_status)
        install_request_id_logging()  # a request's log lines name its id (cluster.request_context)
        tracing.configure((settings or {}).get("tracing"), "ingress")
        loop = asyncio.get_running_loop()
        if not on_replica_shutdown(lambda: loop.call_soon_threadsafe(self.frontend.stopping.set)):
            log.warning("ingress: this Ray Serve gives no shutdown signal (cluster.replica_shutdown): open "
                        "Health.Watch streams will hold this replica's drain until graceful_shutdown_timeout_s")
        await self.frontend.load_tokenizers()
        self._warm_up = loop.create_task(self._warm_up_then_freeze())
        log.info("ingress: serving models %s (API keys %s)", ", ".join(specs),
                 "required" if self.frontend.auth.enabled else "not configured")

    async def _warm_up_then_freeze(self) -> None:
        """Frontend.warm_up, then what start-up and warm-up built out of full garbage collections
        (workers.gc_freeze)."""
        await self.frontend.warm_up()
        freeze_startup_objects("ingress")

    # -- herd.v1.Inference
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async def prepare(route: ModelRoute, tools: ChatTools) -> list[int]:
            which = request.WhichOneof("prompt")
            if which == "text":
                return await self.frontend.encode_prompt(route, request.text, field="text")
            if which == "token_ids":
                return await self.frontend.encode_prompt(route, list(request.token_ids.ids), field="token_ids")
            raise ApiError.invalid("prompt", "set text or token_ids")

        async for resp in self._stream(request, grpc_context, prepare):
            yield resp

    async def Chat(self, request: pb.ChatRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        async def prepare(route: ModelRoute, tools: ChatTools) -> list[int]:
            return await self.frontend.encode_chat(route, messages_from_proto(request.messages), tools=tools)

        async def chat_tools() -> ChatTools:
            return await ChatTools.checked(tools_from_proto(request.tools), tool_choice_from_proto(request),
                                           self.frontend.limits)

        async for resp in self._stream(request, grpc_context, prepare, chat_tools):
            yield resp

    async def _stream(self, request, grpc_context, prepare,
                      chat_tools=None) -> AsyncIterator[pb.GenerateResponse]:
        """Authenticate, validate, `prepare(route, tools)` the prompt ids, stream. `await chat_tools()` gives the
        request's tools (after authentication: an unauthenticated client learns nothing about its input);
        without it, none."""
        span = tracing.start_request_span(type(request).__name__, grpc_context.invocation_metadata())
        client_request_id = grpc_request_id(request.request_id, grpc_context.invocation_metadata())
        try:
            cache_salt = self.frontend.authenticate(grpc_context.invocation_metadata())
            if client_request_id:
                self.frontend.limits.check_request_id(client_request_id)
                set_request_id(client_request_id)   # (only a checked id reaches the logs)
            route = await self.frontend.model(request.model)
            tools = await chat_tools() if chat_tools else ChatTools.none()
            sampling = await self.frontend.check_sampling(tools.constrain(sampling_from_proto(request.sampling)))
            ids = await prepare(route, tools)
            token_text = lambda t: self.frontend.token_text(route, t)  # noqa: E731
            with self.frontend.live_request_ids.hold(client_request_id or uuid.uuid4().hex) as request_id:
                set_request_id(request_id)  # the request's log lines and its model call carry it
                grpc_context.set_trailing_metadata([(REQUEST_ID_HEADER, request_id)])
                tracing.set_attribute(span, "herd.request_id", request_id)
                async for chunk in tools.parse(self.frontend.generate(route, ids, sampling, cache_salt)):
                    for resp in responses_from_chunk(chunk, request_id, token_text, ids):
                        yield resp
        except ApiError as e:
            raise _set_status(grpc_context, e) from None
        except Exception as e:  # noqa: BLE001 - a bug here; the client gets a clean INTERNAL
            log.exception("ingress: request failed")
            raise _set_status(grpc_context, to_api_error(e)) from None
        finally:
            tracing.end_span(span, error=tracing.grpc_error(grpc_context.code()))

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        try:
            self.frontend.authenticate(grpc_context.invocation_metadata())
            route = await self.frontend.model(request.model)
            if request.messages and request.text:
                raise ApiError.invalid("text", "set text or messages, not both")
            if request.messages:
                tools = await ChatTools.checked(tools_from_proto(request.tools), None, self.frontend.limits)
                ids = await self.frontend.encode_chat(route, messages_from_proto(request.messages), tools=tools)
            else:
                if not request.text:
                    raise ApiError.invalid("text", "must not be empty")
                self.frontend.limits.check_tokenize_text(request.text)
                tok = self.frontend.tokenizer_for(route, "text")
                add_bos = request.add_bos if request.HasField("add_bos") else True
                ids = await off_loop(len(request.text), tok.encode, request.text, bos=add_bos)
            info = await self.frontend.info(route)
            return pb.TokenizeResponse(token_ids=ids, tokens=[self.frontend.token_text(route, t) for t in ids],
                                       max_model_len=info["max_model_len"])
        except Exception as e:  # noqa: BLE001
            _set_status(grpc_context, to_api_error(e))
            return pb.TokenizeResponse()  # unary: the status set above is what the client gets

    async def ListModels(self, request: pb.ListModelsRequest, grpc_context) -> pb.ListModelsResponse:
        try:
            self.frontend.authenticate(grpc_context.invocation_metadata())
            models = [pb.ModelInfo(
                name=m["name"], max_model_len=m.get("max_model_len", 0), vocab_size=m.get("vocab_size", 0),
                tensor_parallel_size=m.get("tensor_parallel_size", 1),
                pipeline_parallel_size=m.get("pipeline_parallel_size", 1),
                autoscaling=bool(m.get("autoscaling")), block_size=m.get("block_size", 0),
            ) for m in await self.frontend.list_models()]
            return pb.ListModelsResponse(models=models)
        except Exception as e:  # noqa: BLE001
            _set_status(grpc_context, to_api_error(e))
            return pb.ListModelsResponse()

    # -- grpc.health.v1.Health (no API key: probes cannot send one)
    async def Check(self, request, grpc_context):
        from grpc_health.v1 import health_pb2

        serving = await self.frontend.health(request.service)
        if serving is None:
            _set_status(grpc_context, ApiError("NOT_FOUND", f"unknown service {request.service!r}"))
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    async def Watch(self, request, grpc_context):
        """Streams status changes. Watchers need no key, so they are capped (limits.max_health_watchers per
        ingress replica, whose slots are reserved beside the models' capacity): a flood of them is refused
        with RESOURCE_EXHAUSTED instead of taking the seats inference needs. When Serve begins to shut this
        replica down, each watcher gets NOT_SERVING and its stream ends UNAVAILABLE (watch again: another
        replica answers), so that the drain does not wait for streams that never end by themselves."""
        from grpc_health.v1 import health_pb2

        frontend = self.frontend
        if frontend.health_watchers >= frontend.limits.cfg.max_health_watchers:
            raise _set_status(grpc_context, ApiError(
                "RESOURCE_EXHAUSTED", f"too many Health.Watch streams ({frontend.health_watchers}); "
                                      "poll Health.Check instead"))
        frontend.health_watchers += 1
        try:
            last = None
            while not frontend.stopping.is_set():
                serving = await frontend.health(request.service)
                status = (health_pb2.HealthCheckResponse.SERVICE_UNKNOWN if serving is None else
                          health_pb2.HealthCheckResponse.SERVING if serving else
                          health_pb2.HealthCheckResponse.NOT_SERVING)
                if status != last:
                    yield health_pb2.HealthCheckResponse(status=status)
                    last = status
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(frontend.stopping.wait(), READINESS_TTL_S)
            if last != health_pb2.HealthCheckResponse.NOT_SERVING:
                yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
            raise _set_status(grpc_context, ApiError("UNAVAILABLE", "this replica is shutting down; watch again"))
        finally:
            frontend.health_watchers -= 1


IngressDeployment = serve.deployment(InferenceIngress, name="Ingress")
