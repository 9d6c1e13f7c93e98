"""The serving edge without Ray: input limits, the HTTP guard (API key before the body, body size), retry
before the first token, per-key cache salts, capacity sizing of every hop."""
from __future__ import annotations

import asyncio

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from cluster.config import ClusterConfig, ConfigError, LimitsConfig
from cluster.errors import ApiError
from cluster.ingress import Frontend, ModelRoute, cache_salt_for
from cluster.limits import InputLimits, LiveRequestIds


# ---- limits ----------------------------------------------------------------------------------------------
def limits(**kw) -> InputLimits:
    return InputLimits(LimitsConfig(**kw))


@pytest.mark.parametrize("sampling, field", [
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
    ({"logprobs": 21}, "logprobs"),
    ({"repetition_penalty": 0.001}, "repetition_penalty"),
    ({"repetition_penalty": 11.0}, "repetition_penalty"),
    ({"logit_bias": {str(i): 1.0 for i in range(1025)}}, "logit_bias"),
])
def test_sampling_limits_name_the_field(sampling, field):
    with pytest.raises(ApiError) as e:
        limits().check_sampling(sampling)
    assert (e.value.code, e.value.field) == ("INVALID_ARGUMENT", field)
    assert "limit" in e.value.message or "must be in" in e.value.message


def test_sampling_within_limits_passes():
    limits().check_sampling({"stop": ["a"] * 16, "stop_token_ids": list(range(64)), "logprobs": 20,
                             "repetition_penalty": 1.2, "logit_bias": {str(i): 1.0 for i in range(1024)}})


def test_text_and_message_limits():
    lim = limits(max_prompt_chars=10, max_chat_messages=2, max_tokenize_chars=5, max_prompts_per_request=3,
                 max_prompt_tokens=4)
    lim.check_prompt_text("x" * 10, "prompt")
    for call, field in [(lambda: lim.check_prompt_text("x" * 11, "prompt"), "prompt"),
                        (lambda: lim.check_messages([{"role": "user", "content": "a"}] * 3), "messages"),
                        (lambda: lim.check_messages([{"role": "user", "content": "x" * 11}]), "messages"),
                        (lambda: lim.check_tokenize_text("x" * 6), "text"),
                        (lambda: lim.check_prompt_count(4), "prompt"),
                        (lambda: lim.check_prompt_tokens(5, "prompt"), "prompt")]:
        with pytest.raises(ApiError) as e:
            call()
        assert e.value.field == field and e.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("rid, ok", [("abc-123_x.y:z", True), ("a" * 128, True), ("a" * 129, False),
                                     ("has space", False), ("new\nline", False), ("ü", False)])
def test_request_id_bounds(rid, ok):
    if ok:
        limits().check_request_id(rid)
    else:
        with pytest.raises(ApiError) as e:
            limits().check_request_id(rid)
        assert e.value.field == "request_id"


def test_duplicate_live_request_id_is_refused_until_released():
    live = LiveRequestIds()
    with live.hold("r1"):
        with pytest.raises(ApiError) as e:
            live.hold("r1")
        assert e.value.code == "ALREADY_EXISTS" and e.value.http_status == 409
    with live.hold("r1"):  # released: usable again
        assert len(live) == 1
    assert len(live) == 0


# ---- per-key prefix-cache salts ------------------------------------------------------------------------
def test_cache_salt_per_key():
    fe = Frontend({}, {}, ["key-a", "key-b"], settings={"prefix_cache_isolation": "per_key"})
    a = fe.authenticate([("authorization", "Bearer key-a")])
    b = fe.authenticate([("x-api-key", "key-b")])
    assert a and b and a != b
    assert a == fe.authenticate([("x-api-key", "key-a")])  # a key's salt is stable
    shared = Frontend({}, {}, ["key-a"])
    assert shared.authenticate([("x-api-key", "key-a")]) == 0
    assert cache_salt_for(None) == 0


# ---- capacity sizing ----------------------------------------------------------------------------------------
def test_capacity_defaults_derive_from_max_num_seqs():
    from cluster.app import ingress_deployment_options, model_deployment_options

    cfg = ClusterConfig.from_dict({"models": [
        {"name": "a", "path": "/a", "max_num_seqs": 32},
        {"name": "b", "path": "/b", "autoscaling_config": {"min_replicas": 1, "max_replicas": 3}},
    ]})
    a, b = cfg.models
    assert a.engine_args()["max_num_seqs"] == 32 and a.engine_args()["max_queued_requests"] == 32
    opts = model_deployment_options(a)
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (64 + 4, 32)  # + control headroom
    assert model_deployment_options(b)["max_ongoing_requests"] == 256 + 4
    ingress = ingress_deployment_options(cfg)
    # one ingress replica carries every model at full scale: 68+32 and 3*260+128, plus watchers and headroom
    assert ingress["max_ongoing_requests"] >= (68 + 32) + (3 * 260 + 128) + cfg.limits.max_health_watchers
    assert ingress["max_queued_requests"] >= 0 and ingress["num_replicas"] == 1


def test_capacity_overrides_and_ingress_autoscaling():
    from cluster.app import ingress_deployment_options, model_deployment_options

    cfg = ClusterConfig.from_dict({
        "ingress_autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 200},
        "ingress_max_ongoing_requests": 500,
        "models": [{"name": "a", "path": "/a", "max_num_seqs": 8, "max_queued_requests": 0,
                    "max_ongoing_requests": 10, "serve_max_queued_requests": 2}]})
    opts = model_deployment_options(cfg.models[0])
    assert (opts["max_ongoing_requests"], opts["max_queued_requests"]) == (10, 2)
    assert cfg.models[0].engine_args()["max_queued_requests"] == 0
    ingress = ingress_deployment_options(cfg)
    assert ingress["max_ongoing_requests"] == 500 and ingress["autoscaling_config"]["max_replicas"] == 4
    assert "num_replicas" not in ingress


def test_rolling_update_surge_reaches_serve():
    """Models stop old replicas first unless they say (their replacements need room); the ingress, a tenth of a
    CPU, starts its new replicas first. Serve's own deployment options take both."""
    from cluster.app import ingress_deployment_options, model_deployment_options
    from cluster.deployment import ModelDeployment
    from cluster.ingress import IngressDeployment

    cfg = ClusterConfig.from_dict({"models": [{"name": "a", "path": "/a"},
                                              {"name": "b", "path": "/b", "max_surge_percent": 100}]})
    a, b = (model_deployment_options(m) for m in cfg.models)
    assert (a["max_surge_percent"], b["max_surge_percent"]) == (0, 100)
    assert ModelDeployment.options(**b)._deployment_config.max_surge_percent == 100
    ingress = ingress_deployment_options(cfg)
    assert ingress["max_surge_percent"] == 100
    assert IngressDeployment.options(**ingress)._deployment_config.max_surge_percent == 100
    with pytest.raises(ConfigError, match=r"models\[0\].max_surge_percent: .*less than or equal to 100"):
        ClusterConfig.from_dict({"models": [{"name": "a", "path": "/a", "max_surge_percent": 101}]})


@pytest.mark.parametrize("host, extra, ok", [
    ("127.0.0.1", {}, True), ("localhost", {}, True), ("::1", {}, True),
    ("0.0.0.0", {}, False), ("10.1.2.3", {}, False),
    ("0.0.0.0", {"api_keys": ["k"]}, True), ("0.0.0.0", {"allow_unauthenticated": True}, True),
])
def test_non_loopback_needs_keys_or_explicit_consent(host, extra, ok):
    from cluster.config import ConfigError

    data = {"host": host, "models": [{"name": "m", "path": "/m"}], **extra}
    if ok:
        ClusterConfig.from_dict(data)
    else:
        with pytest.raises(ConfigError, match="allow_unauthenticated"):
            ClusterConfig.from_dict(data)


def test_constraints_and_tools_are_bounded_and_large_ones_checked_off_the_event_loop(monkeypatch):
    """A schema, regex, grammar or set of choices over limits.max_structured_chars, and tools over
    limits.max_tools_chars, are refused naming the field and the key; under the bounds, large ones are checked
    in a worker thread (llguidance took 0.8 s on a 378 KB schema), small ones inline."""
    import threading

    import workers.structured_output as structured_output
    import workers.tool_calls as tool_calls
    from cluster.chat_tools import ChatTools

    checked_on: list[int] = []

    def recording(real):
        def check(*args, **kwargs):
            checked_on.append(threading.get_ident())
            return real(*args, **kwargs)
        return check

    monkeypatch.setattr(structured_output, "validate_structured", recording(structured_output.validate_structured))
    monkeypatch.setattr(tool_calls, "validate_tools", recording(tool_calls.validate_tools))
    fe = Frontend({}, {}, settings={"limits": {"max_structured_chars": 6000, "max_tools_chars": 8000}})

    def tool(name: str, description: str = "") -> dict:
        return {"type": "function", "function": {"name": name, "description": description,
                                                 "parameters": {"type": "object", "properties": {}}}}

    async def go():
        loop_thread = threading.get_ident()
        await fe.check_sampling({"structured": {"regex": "[a-z]{3}"}})
        await fe.check_sampling({"structured": {"json_schema": {"enum": [f"v{i:05d}" for i in range(500)]}}})
        small = await ChatTools.checked([tool("f")], "auto", fe.limits)
        large = await ChatTools.checked([tool(f"f{i}", "d" * 200) for i in range(20)], "required", fe.limits)
        refused = []
        for call in (lambda: fe.check_sampling({"structured": {"choice": ["x" * 3000, "y" * 3001]}}),
                     lambda: fe.check_sampling({"structured": {"json_schema": {"enum": ["v" * 50] * 200}}}),
                     lambda: ChatTools.checked([tool(f"f{i}", "d" * 400) for i in range(20)], "auto", fe.limits)):
            with pytest.raises(ApiError) as e:
                await call()
            refused.append(e.value)
        return loop_thread, small, large, refused

    loop_thread, small, large, refused = asyncio.run(go())
    regex, schema, one_tool, twenty_tools = checked_on
    assert regex == loop_thread and one_tool == loop_thread                   # small: inline
    assert schema != loop_thread and twenty_tools != loop_thread              # over 4,096 characters: a thread
    assert small.chars < 4096 < large.chars <= 8000 and len(large.tools) == 20
    assert [(e.code, e.field) for e in refused] == [("INVALID_ARGUMENT", "structured")] * 2 + [
        ("INVALID_ARGUMENT", "tools")]
    assert "limits.max_structured_chars" in refused[0].message and "6001 characters" in refused[0].message
    assert "limits.max_tools_chars" in refused[2].message
    assert len(checked_on) == 4     # nothing over a bound was checked at all


def test_chat_tools_size_counts_in_the_chat_s_off_loop_decision():
    """encode_chat renders the tools with the messages: a short chat with large tools is rendered in a thread."""
    import threading

    from cluster.chat_tools import ChatTools

    rendered_on = []

    class Tok:
        def apply_chat_template(self, messages, add_generation_prompt, tools):
            rendered_on.append(threading.get_ident())
            return [1, 2, 3]

    fe = Frontend({}, {})
    fe.tokenizer_for = lambda route, field: Tok()

    async def no_prompt_check(route, ids, field):
        return None

    fe.check_prompt = no_prompt_check

    async def go():
        msgs = [{"role": "user", "content": "hi"}]
        await fe.encode_chat(ModelRoute("m", object(), {"name": "m"}), msgs, tools=ChatTools(None, "none", 10))
        await fe.encode_chat(ModelRoute("m", object(), {"name": "m"}), msgs, tools=ChatTools(None, "none", 5000))
        return threading.get_ident()

    loop_thread = asyncio.run(go())
    assert rendered_on[0] == loop_thread and rendered_on[1] != loop_thread


# ---- the HTTP guard -------------------------------------------------------------------------------------------
@pytest.fixture
def guarded_app():
    from cluster.openai_http import EdgeGuard, _body_refused_handler
    from cluster.request_body import BodyRefused

    frontend = Frontend({}, {}, ["sekrit"], settings={"limits": {"max_request_body_bytes": 2048},
                                                      "prefix_cache_isolation": "per_key"})
    reads = []
    app = FastAPI()
    app.add_middleware(EdgeGuard, frontend=lambda: frontend)
    app.add_exception_handler(BodyRefused, _body_refused_handler)

    @app.post("/v1/echo")
    async def echo(request: Request):
        body = await request.body()
        reads.append(len(body))
        return {"bytes": len(body), "salt": request.state.cache_salt}

    @app.post("/v1/json")
    async def parsed(payload: dict):
        reads.append(1)
        return {"keys": len(payload)}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return TestClient(app), reads


def test_guard_refuses_without_key_before_reading_the_body(guarded_app):
    client, reads = guarded_app
    r = client.post("/v1/echo", content=b"x" * 100_000)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert reads == []  # the route never ran, so the body was never read
    assert client.get("/health").status_code == 200  # probes need no key


def test_guard_limits_the_body(guarded_app):
    client, reads = guarded_app
    key = {"authorization": "Bearer sekrit"}
    ok = client.post("/v1/echo", content=b"x" * 2048, headers=key)
    assert ok.status_code == 200 and ok.json()["bytes"] == 2048 and ok.json()["salt"] != 0
    big = client.post("/v1/echo", content=b"x" * 2049, headers=key)
    assert big.status_code == 413 and big.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b"y" * 1000
    streamed = client.post("/v1/json", content=chunks(), headers=key)
    assert streamed.status_code == 413
    assert reads == [2048]


def test_starlettes_own_errors_get_openai_bodies():
    """A 404 / 405 / unparsable body refused by FastAPI itself, before any herd route runs."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from cluster.openai_http import _http_exception_handler, openai_app

    assert openai_app.exception_handlers[StarletteHTTPException] is _http_exception_handler
    app = FastAPI()
    app.add_exception_handler(StarletteHTTPException, _http_exception_handler)

    @app.post("/v1/json")
    async def parsed(payload: dict):
        return {"keys": len(payload)}

    client = TestClient(app)
    missing = client.post("/v1/nope", json={})
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": "no route POST /v1/nope", "type": "not_found_error", "param": None,
                                       "code": "not_found"}
    wrong = client.get("/v1/json")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == "method_not_allowed" and "GET /v1/json" in wrong.json()["error"]["message"]
    for body in (b'{"a": "\xff"}', b'{"a":' * 100_000):   # not UTF-8; nested past the JSON parser's depth
        bad = client.post("/v1/json", content=body, headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "body", bad.text
        assert "could not be parsed" in bad.json()["error"]["message"]


# ---- retry before the first token --------------------------------------------------------------------------
class _Stream:
    def __init__(self, chunks, fail_with=None):
        self.chunks, self.fail_with, self.cancelled = chunks, fail_with, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for c in self.chunks:
            yield c
        if self.fail_with is not None:
            raise self.fail_with

    def cancel(self):
        self.cancelled = True


class _Handle:
    """A DeploymentHandle stand-in whose calls play back scripted streams."""

    def __init__(self, scripts):
        self.scripts, self.calls = list(scripts), 0
        self.options_seen, self.args_seen = [], []

    def options(self, **options):
        self.options_seen.append(options)
        return self

    @property
    def generate_stream(self):
        return self

    def remote(self, *args, **kwargs):
        self.calls += 1
        self.args_seen.append((args, kwargs))
        return self.scripts.pop(0)


def _chunk(finish=None):
    return {"token_ids": [1], "text": "a", "logprobs": None, "finish_reason": finish, "prompt_tokens": 1,
            "cached_tokens": 0, "completion_tokens": 1}


def _run(frontend_generate):
    async def go():
        return [c async for c in frontend_generate]
    return asyncio.run(go())


def test_replica_death_before_the_first_token_is_retried_once():
    from ray.exceptions import ActorDiedError

    handle = _Handle([_Stream([], ActorDiedError()), _Stream([_chunk(), _chunk("length")])])
    fe = Frontend({"m": handle}, {"m": {"name": "m"}})
    chunks = _run(fe.generate(fe.routes["m"], [1, 2], {}))
    assert [c["finish_reason"] for c in chunks] == [None, "length"] and handle.calls == 2


class _Waiting:
    """A model with no replica: its stream's first chunk never comes, its model_info never answers."""

    def __init__(self):
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        await asyncio.Event().wait()

    def cancel(self):
        self.cancelled = True


def _frontend_of_a_model_that(states):
    """A Frontend whose one model has no replica; `states()` is what Serve's controller says of it each time."""
    from cluster.ingress import ModelState

    stream = _Waiting()
    fe = Frontend({"m": _Handle([stream])}, {"m": {"name": "m"}})
    fe._states_from_controller = lambda: {"m": ModelState(**states())}
    return fe, stream


@pytest.mark.parametrize("fails", ["before", "while waiting"])
def test_a_model_serve_gave_up_on_is_unavailable_at_once_not_at_the_deadline(monkeypatch, fails):
    """A deployment that failed (a bad checkpoint path) has no replica and gets none: a call would wait for one
    until its deadline (600 s by default). The ingress answers UNAVAILABLE as soon as Serve says it failed."""
    import time

    import cluster.ingress as ingress

    monkeypatch.setattr(ingress, "READINESS_TTL_S", 0.0)
    monkeypatch.setattr(ingress, "AVAILABILITY_RECHECK_S", 0.05)
    t0 = time.monotonic()
    failure_after = 0.0 if fails == "before" else 0.3
    fe, stream = _frontend_of_a_model_that(lambda: {
        "ready": False, "failure": "its deployment failed" if time.monotonic() - t0 >= failure_after else None})
    with pytest.raises(ApiError) as e:
        _run(fe.generate(fe.routes["m"], [1, 2], {}))
    assert e.value.code == "UNAVAILABLE" and "'m' has no replica: its deployment failed" in e.value.message
    assert time.monotonic() - t0 < 5 and (fails == "before" or stream.cancelled)


def test_a_model_still_starting_is_waited_for():
    """No replica yet, nothing failed (starting, or scaled to zero): the call waits, as Serve's handle does."""
    import cluster.ingress as ingress

    fe, stream = _frontend_of_a_model_that(lambda: {"ready": False})

    async def go():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(_run_async(fe.generate(fe.routes["m"], [1], {})), 3 * ingress.AVAILABILITY_RECHECK_S)
    asyncio.run(go())
    assert stream.cancelled   # the caller gave up: the model's stream is cancelled with it


def test_a_request_never_waits_for_serves_controller():
    """The failed-model check reads what the controller last said and renews it in the background: with the
    controller away (it restarts; test_serve_load pauses it around a replica kill) requests still flow."""
    import threading
    import time

    from cluster.ingress import ModelState

    controller_back = threading.Event()
    handle = _Handle([_Stream([_chunk("length")]), _Stream([_chunk("length")])])
    fe = Frontend({"m": handle}, {"m": {"name": "m"}})
    fe._states_from_controller = lambda: controller_back.wait(30) and {"m": ModelState(ready=True)}

    async def go():
        started = time.monotonic()
        first = [c["finish_reason"] for c in await _run_async(fe.generate(fe.routes["m"], [1], {}))]
        second = [c["finish_reason"] for c in await _run_async(fe.generate(fe.routes["m"], [1], {}))]
        took = time.monotonic() - started
        controller_back.set()
        return first, second, took
    first, second, took = asyncio.run(go())
    assert first == second == ["length"] and took < 5


def test_readiness_asks_again_rather_than_say_a_stale_not_ready():
    """Calls waiting for a starting model keep the controller's answer for READINESS_TTL_S; a probe right after
    the model's replica started must not get that old "not ready" (herd serve said ready; its health check did
    not: test_serve_startup)."""
    from cluster.ingress import ModelState

    running = {"now": False}
    fe = Frontend({"m": _Handle([])}, {"m": {"name": "m"}})
    asked = []
    fe._states_from_controller = lambda: asked.append(1) or {"m": ModelState(ready=running["now"])}

    async def go():
        await fe.model_states()            # cached: not ready
        running["now"] = True
        return await fe.readiness(), await fe.readiness()
    assert asyncio.run(go()) == ({"m": True}, {"m": True}) and len(asked) == 2   # a ready answer is reused


async def _run_async(frontend_generate):
    return [c async for c in frontend_generate]


def test_model_info_of_a_failed_model_is_unavailable(monkeypatch):
    import cluster.ingress as ingress

    monkeypatch.setattr(ingress, "READINESS_TTL_S", 0.0)
    monkeypatch.setattr(ingress, "AVAILABILITY_RECHECK_S", 0.05)
    fe, _ = _frontend_of_a_model_that(lambda: {"ready": False, "failure": "its deployment failed"})

    class NeverAnswers:
        def remote(self):
            return asyncio.Event().wait()
    fe.routes["m"].handle.model_info = NeverAnswers()
    with pytest.raises(ApiError) as e:
        asyncio.run(fe.info(fe.routes["m"]))
    assert e.value.code == "UNAVAILABLE"


def test_a_replica_lost_over_serves_grpc_transport_is_retried_too():
    """Serve's gRPC transport reports a dead replica as ActorUnavailableError (gRPC UNAVAILABLE)."""
    from ray.exceptions import ActorUnavailableError

    handle = _Handle([_Stream([], ActorUnavailableError("replica gone", None)), _Stream([_chunk("length")])])
    fe = Frontend({"m": handle}, {"m": {"name": "m"}})
    assert [c["finish_reason"] for c in _run(fe.generate(fe.routes["m"], [1], {}))] == ["length"]
    assert handle.calls == 2


@pytest.mark.parametrize("transport, by_reference", [(None, False), ("grpc", False), ("ray", True)])
def test_the_model_call_follows_serve_transport_with_positional_arguments(transport, by_reference):
    """serve_transport picks the handle's transport (grpc by default); every argument goes positionally, as
    Serve's gRPC transport needs, in generate_stream's order (prompt, sampling, request id, salt, context)."""
    from cluster.request_context import set_request_id

    handle = _Handle([_Stream([_chunk("length")])])
    settings = {"serve_transport": transport} if transport else {}
    fe = Frontend({"m": handle}, {"m": {"name": "m"}}, settings=settings)

    async def go():  # the id is set in this task's context only
        set_request_id("client-9")
        return [c async for c in fe.generate(fe.routes["m"], [5, 6], {"max_tokens": 1}, cache_salt=42)]
    asyncio.run(go())
    assert handle.options_seen == [{"stream": True, "_by_reference": by_reference}]
    (args, kwargs), = handle.args_seen
    assert kwargs == {} and args[0] == [5, 6] and args[1] == {"max_tokens": 1} and args[3] == 42
    assert isinstance(args[2], str) and args[4]["request_id"] == "client-9"


def test_no_retry_after_a_token_was_streamed_or_for_client_errors():
    from ray.exceptions import ActorDiedError

    handle = _Handle([_Stream([_chunk()], ActorDiedError())])
    fe = Frontend({"m": handle}, {"m": {"name": "m"}})
    with pytest.raises(ApiError) as e:
        _run(fe.generate(fe.routes["m"], [1], {}))
    assert e.value.code == "UNAVAILABLE" and handle.calls == 1

    bad = _Stream([{"error": {"code": "INVALID_ARGUMENT", "message": "x", "field": "stop"}}])
    handle = _Handle([bad])
    fe = Frontend({"m": handle}, {"m": {"name": "m"}})
    with pytest.raises(ApiError) as e:
        _run(fe.generate(fe.routes["m"], [1], {}))
    assert e.value.code == "INVALID_ARGUMENT" and handle.calls == 1


def test_a_second_death_is_reported_unavailable():
    from ray.exceptions import ActorDiedError

    handle = _Handle([_Stream([], ActorDiedError()), _Stream([], ActorDiedError())])
    fe = Frontend({"m": handle}, {"m": {"name": "m"}})
    with pytest.raises(ApiError) as e:
        _run(fe.generate(fe.routes["m"], [1], {}))
    assert e.value.code == "UNAVAILABLE" and handle.calls == 2


def test_model_route_is_unchanged():  # the route record other code builds on
    route = ModelRoute("m", object(), {"name": "m"})
    assert route.tokenizer is None and route.info is None


def test_long_texts_are_tokenized_off_the_event_loop():
    """A 1 MB prompt is encoded in a worker thread, so the ingress's loop keeps serving other streams."""
    import threading
    import time

    from cluster.off_loop import OFF_LOOP_CHARS, off_loop

    async def go():
        loop_thread = threading.get_ident()
        ticks = 0

        def encode(text):
            start = ticks
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:   # a slow tokenizer
                pass
            return threading.get_ident(), ticks - start

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.create_task(ticker())
        big_thread, ticks_during_big = await off_loop(1 << 20, encode, "x" * (1 << 20))
        small_thread, _ = await off_loop(OFF_LOOP_CHARS, encode, "short")
        t.cancel()
        return loop_thread, big_thread, ticks_during_big, small_thread

    loop_thread, big_thread, ticks_during_big, small_thread = asyncio.run(go())
    assert big_thread != loop_thread and ticks_during_big > 0   # the loop kept running meanwhile
    assert small_thread == loop_thread                          # short texts stay inline


def test_logs_of_answered_calls_keep_their_line_but_not_their_traceback():
    import logging
    import sys

    from cluster.grpc_status import StatusLogFilter, StatusSet

    class Wrapped(Exception):  # like Serve's gRPCStatusError: the user's exception as original_exception
        def __init__(self, original):
            super().__init__("wrapped")
            self.original_exception = original

    def record_for(exc):
        try:
            raise exc
        except Exception:
            return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None,
                                     sys.exc_info())

    quiet = StatusLogFilter()
    answered = record_for(Wrapped(StatusSet("full")))
    assert quiet.filter(answered) and answered.exc_info is None and answered.getMessage() == "Request failed."
    try:
        try:
            raise StatusSet("bad")
        except StatusSet as e:
            raise RuntimeError("wrapper") from e
    except RuntimeError as chained:
        rec = record_for(chained)
        assert quiet.filter(rec) and rec.exc_info is None
    for failure in (KeyError("a bug"), Wrapped(ApiError("INTERNAL", "x"))):  # real failures keep theirs
        rec = record_for(failure)
        assert quiet.filter(rec) and rec.exc_info is not None and rec.levelno == logging.ERROR


@pytest.mark.parametrize("code, level", [("RESOURCE_EXHAUSTED", "INFO"), ("INVALID_ARGUMENT", "INFO"),
                                         ("UNAUTHENTICATED", "INFO"), ("DEADLINE_EXCEEDED", "INFO"),
                                         ("UNAVAILABLE", "ERROR"), ("INTERNAL", "ERROR"), ("", "ERROR")])
def test_calls_answered_with_a_client_status_are_not_logged_as_errors(code, level):
    """Serve's replica and proxy log every streaming call that ended with a status at ERROR: an overloaded server
    wrote two ERROR lines per refusal. A status the client is to act on is INFO (its line stays); one that says
    the server failed stays ERROR. The code survives the pickling that carries StatusSet to Serve's proxy."""
    import logging
    import pickle
    import sys

    from cluster.grpc_status import StatusLogFilter, StatusSet
    from cluster.ingress import _set_status

    class Context:
        def set_code(self, c):
            self.code = c

        def set_details(self, d):
            self.details = d

    class Wrapped(Exception):  # Serve's proxy: gRPCStatusError(original_exception=the unpickled StatusSet)
        def __init__(self, original):
            super().__init__("wrapped")
            self.original_exception = original

    status = _set_status(Context(), ApiError(code, "m")) if code else StatusSet("m")
    assert status.code == code and str(status) == "m"
    carried = pickle.loads(pickle.dumps(status))
    assert (carried.code, str(carried)) == (code, "m")
    for exc in (status, Wrapped(carried)):
        try:
            raise exc
        except Exception:
            record = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None,
                                       sys.exc_info())
        assert StatusLogFilter().filter(record) and record.exc_info is None
        assert (record.levelname, record.levelno) == (level, getattr(logging, level))


def test_the_exception_that_ends_a_stream_imports_nothing_of_herd():
    """Serve's proxy unpickles it: its module must not pull in the engine (torch)."""
    import subprocess
    import sys

    code = ("import sys, pickle; from cluster.grpc_status import StatusSet; "
            "pickle.loads(pickle.dumps(StatusSet('x'))); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'workers', 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_model_states_come_from_the_controllers_plain_details_not_serve_status(monkeypatch):
    """What the ingress asks Serve's controller every READINESS_TTL_S under load: its plain details dict
    (cluster.status.serve_details), which costs the ingress ~1 ms, not serve.status(), which builds pydantic
    models of it (and cloudpickles each deployment's router class) while the ingress's loops wait for the GIL.
    Ready = a RUNNING replica, in the model's own application where it has one; failed = DEPLOY_FAILED with none."""
    from types import SimpleNamespace

    from ray import serve
    from ray.serve._private.common import DeploymentStatus, ReplicaState

    import cluster.status

    def deployment(status, *states):
        return {"status": status, "replicas": [{"state": s} for s in states]}

    details = {"applications": {
        "herd": {"deployments": {"model-a": deployment(DeploymentStatus.UPDATING, ReplicaState.STARTING,
                                                       ReplicaState.RUNNING),
                                 "model-b": deployment(DeploymentStatus.DEPLOY_FAILED)}},
        "herd-model-c": {"deployments": {"model-c": deployment(DeploymentStatus.UNHEALTHY, ReplicaState.STOPPING)}}}}
    monkeypatch.setattr(cluster.status, "serve_details", lambda: details)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="herd"))
    monkeypatch.setattr(serve, "status", lambda: pytest.fail("the ingress asked serve.status()"))
    names = ("a", "b", "c", "gone")
    fe = Frontend({n: _Handle([]) for n in names}, {n: {"name": n, "deployment": f"model-{n}"} for n in names},
                  applications={"c": "herd-model-c"})
    states = fe._states_from_controller()
    assert {n: s.ready for n, s in states.items()} == {"a": True, "b": False, "c": False, "gone": False}
    assert "DEPLOY_FAILED" in states["b"].failure
    assert states["a"].failure is None and states["c"].failure is None and states["gone"].failure is None
