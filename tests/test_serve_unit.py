"""Fast tests of the serving edge without Ray: error mapping, API-key auth, proto/OpenAI request conversion."""
from __future__ import annotations

import asyncio
import pickle

import grpc
import pytest

from cluster.errors import ApiError, error_to_dict, to_api_error
from cluster.ingress import ApiKeyAuth
from cluster.proto_convert import sampling_from_proto
from cluster.pb import inference_pb2 as pb
from workers.errors import (CheckpointError, EngineUnavailableError, InvalidRequestError, PromptTooLongError,
                            QueueFullError, RequestFailedError)


# ---- error mapping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc, code, http, field", [
    (InvalidRequestError("temperature", "must be >= 0"), "INVALID_ARGUMENT", 400, "temperature"),
    (PromptTooLongError(5000, 4096), "INVALID_ARGUMENT", 400, "prompt"),
    (QueueFullError("full"), "RESOURCE_EXHAUSTED", 429, None),
    (EngineUnavailableError("shard 3 died"), "UNAVAILABLE", 503, None),
    (CheckpointError("no config.json"), "UNAVAILABLE", 503, None),
    (TimeoutError(), "DEADLINE_EXCEEDED", 504, None),
    (ApiError.unknown_model("x", ["a", "b"]), "NOT_FOUND", 404, "model"),
    (ApiError.unauthenticated(), "UNAUTHENTICATED", 401, None),
    (KeyError("oops"), "INTERNAL", 500, None),
    (RequestFailedError("sampling this request failed"), "INTERNAL", 500, None),
])
def test_error_mapping(exc, code, http, field):
    err = to_api_error(exc)
    assert (err.code, err.http_status, err.field) == (code, http, field)
    assert err.grpc_code == getattr(grpc.StatusCode, code)


def test_field_is_named_in_the_message():
    err = to_api_error(InvalidRequestError("top_p", "must be in (0, 1]"))
    assert err.message.startswith("top_p:")


def test_internal_errors_hide_details():
    err = to_api_error(RuntimeError("/secret/path/weights.safetensors corrupted"))
    assert "secret" not in err.message and err.code == "INTERNAL"


def test_serve_errors_by_type():
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    assert to_api_error(BackPressureError(num_queued_requests=3, max_queued_requests=2)).code == "RESOURCE_EXHAUSTED"
    assert to_api_error(DeploymentUnavailableError("d")).code == "UNAVAILABLE"


def test_errors_travel_as_dicts_and_pickles():
    d = error_to_dict(PromptTooLongError(10, 8))
    back = ApiError.from_dict(d["error"])
    assert (back.code, back.field) == ("INVALID_ARGUMENT", "prompt")
    again = pickle.loads(pickle.dumps(back))
    assert (again.code, again.message, again.field) == (back.code, back.message, back.field)


def test_openai_error_body():
    body = ApiError.unknown_model("nope", ["m"]).openai_body()
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert body["error"]["type"] == "not_found_error"


# ---- auth ------------------------------------------------------------------------------------------------
def test_auth_disabled_without_keys():
    ApiKeyAuth([]).check([])


@pytest.mark.parametrize("headers", [
    [("authorization", "Bearer k2")],
    [("Authorization", "bearer   k2 ")],
    [("x-api-key", "k1")],
    [("user-agent", "grpc"), ("x-api-key", "k2")],
])
def test_auth_accepts_configured_keys(headers):
    ApiKeyAuth(["k1", "k2"]).check(headers)


@pytest.mark.parametrize("headers, words", [
    ([], "missing"),
    ([("authorization", "Basic k1")], "missing"),
    ([("authorization", "Bearer nope")], "invalid"),
    ([("x-api-key", "k1x")], "invalid"),
    ([("x-api-key-bin", b"k1")], "missing"),
])
def test_auth_rejects(headers, words):
    with pytest.raises(ApiError) as e:
        ApiKeyAuth(["k1"]).check(headers)
    assert e.value.code == "UNAUTHENTICATED" and words in e.value.message
    assert "k1" not in e.value.message  # never echo a key


# ---- request conversion ------------------------------------------------------------------------------------
def test_sampling_from_proto_only_set_fields():
    assert sampling_from_proto(pb.SamplingParams()) == {}
    msg = pb.SamplingParams(temperature=0.0, max_tokens=5, stop=["\n"], stop_token_ids=[7], ignore_eos=False,
                            logprobs=0, seed=3)
    assert sampling_from_proto(msg) == {"temperature": 0.0, "max_tokens": 5, "stop": ["\n"], "stop_token_ids": [7],
                                        "ignore_eos": False, "logprobs": 0, "seed": 3}


def test_sampling_from_proto_new_fields():
    msg = pb.SamplingParams(n=3, logit_bias={5: 100.0, 9: -100.0}, prompt_logprobs=2,
                            structured=pb.StructuredOutput(choice=pb.Choices(choices=["yes", "no"])))
    assert sampling_from_proto(msg) == {"n": 3, "logit_bias": {5: 100.0, 9: -100.0}, "prompt_logprobs": 2,
                                        "structured": {"choice": ["yes", "no"]}}
    schema = '{"type": "object"}'
    assert sampling_from_proto(pb.SamplingParams(structured=pb.StructuredOutput(json_schema=schema))) == {
        "structured": {"json_schema": schema}}
    assert sampling_from_proto(pb.SamplingParams(structured=pb.StructuredOutput(json_object=True))) == {
        "structured": {"json_object": True}}
    with pytest.raises(ApiError) as e:
        sampling_from_proto(pb.SamplingParams(structured=pb.StructuredOutput()))
    assert e.value.field == "sampling.structured"


def test_sampling_dict_builds_workers_params():
    from workers import SamplingParams

    d = sampling_from_proto(pb.SamplingParams(temperature=0.0, max_tokens=5, top_k=3, n=2,
                                              structured=pb.StructuredOutput(regex="[ab]+")))
    p = SamplingParams.from_dict(d)
    assert (p.temperature, p.max_tokens, p.top_k, p.top_p, p.n, p.structured.regex) == (0.0, 5, 3, 1.0, 2, "[ab]+")


def test_chat_messages_and_tools_from_proto():
    from cluster.proto_convert import messages_from_proto, tool_choice_from_proto, tools_from_proto

    req = pb.ChatRequest(
        model="m", messages=[
            pb.ChatMessage(role="user", content="weather?"),
            pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="call_1", name="w", arguments='{"c": 1}')]),
            pb.ChatMessage(role="tool", tool_call_id="call_1", content="sunny")],
        tools=[pb.Tool(name="w", description="weather", parameters='{"type": "object"}')],
        tool_choice=pb.ToolChoice(function="w"))
    assert messages_from_proto(req.messages) == [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"c": 1}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    assert tools_from_proto(req.tools) == [{"type": "function", "function": {
        "name": "w", "description": "weather", "parameters": {"type": "object"}}}]
    assert tool_choice_from_proto(req) == {"type": "function", "function": {"name": "w"}}
    assert tool_choice_from_proto(pb.ChatRequest(tool_choice=pb.ToolChoice(mode="required"))) == "required"
    assert tool_choice_from_proto(pb.ChatRequest()) is None
    with pytest.raises(ApiError) as e:
        tools_from_proto([pb.Tool(name="w", parameters="{not json")])
    assert e.value.field == "tools[0].parameters"


def test_response_from_chunk_carries_index_tool_calls_and_prompt_logprobs():
    from cluster.proto_convert import response_from_chunk

    chunk = {"index": 2, "token_ids": [5], "text": "", "logprobs": None, "finish_reason": "tool_calls",
             "prompt_tokens": 3, "cached_tokens": 0, "completion_tokens": 4,
             "tool_calls": [{"id": "call_x", "type": "function", "function": {"name": "w", "arguments": "{}"}}],
             "prompt_logprobs": [None, {"logprob": -1.5, "top": [[7, -0.5]]}, {"logprob": -2.0, "top": []}]}
    resp = response_from_chunk(chunk, "r1", lambda t: f"<{t}>", [1, 8, 9])
    assert (resp.index, resp.finish_reason, resp.usage.completion_tokens) == (2, "tool_calls", 4)
    assert [(c.id, c.name, c.arguments) for c in resp.tool_calls] == [("call_x", "w", "{}")]
    assert [(p.token_id, p.logprob) for p in resp.prompt_logprobs] == [(8, -1.5), (9, -2.0)]
    assert [(t.token_id, t.token) for t in resp.prompt_logprobs[0].top_logprobs] == [(7, "<7>")]


def test_a_long_prompts_logprobs_come_in_several_bounded_responses():
    """Each response carries at most PROMPT_LOGPROBS_PER_MESSAGE prompt positions: the leading ones only
    those (with request_id and index), the last one the rest with the chunk's tokens; all in order. At the
    default, a 16k-token prompt's top-20 logprobs in one response were 7 MiB."""
    from cluster.proto_convert import PROMPT_LOGPROBS_PER_MESSAGE, responses_from_chunk

    prompt = list(range(100, 100 + 2 * PROMPT_LOGPROBS_PER_MESSAGE + 8))
    entries = [None] + [{"logprob": -float(i), "top": [[i, -0.25]] * 20} for i in range(1, len(prompt))]
    chunk = {"index": 1, "token_ids": [5], "text": "x", "logprobs": None, "finish_reason": None,
             "prompt_logprobs": entries}
    responses = list(responses_from_chunk(chunk, "r9", lambda t: f"<{t}>", prompt))
    assert [len(r.prompt_logprobs) for r in responses] == [PROMPT_LOGPROBS_PER_MESSAGE] * 2 + [7]
    assert all((r.request_id, r.index) == ("r9", 1) for r in responses)
    assert [list(r.token_ids) for r in responses] == [[], [], [5]] and responses[-1].text == "x"
    flat = [p for r in responses for p in r.prompt_logprobs]
    assert [p.token_id for p in flat] == prompt[1:] and [p.logprob for p in flat] == [-float(i) for i in
                                                                                      range(1, len(prompt))]
    assert max(r.ByteSize() for r in responses) < 1 << 20
    # a short prompt (or none) stays one response, equal to response_from_chunk's
    short = {**chunk, "prompt_logprobs": entries[:4]}
    [one] = responses_from_chunk(short, "r9", lambda t: f"<{t}>", prompt)
    assert [p.token_id for p in one.prompt_logprobs] == prompt[1:4] and list(one.token_ids) == [5]
    [plain] = responses_from_chunk({**chunk, "prompt_logprobs": None}, "r9", str, prompt)
    assert not plain.prompt_logprobs


def test_a_whole_completion_is_gathered_from_many_interleaved_chunks():
    """Non-streamed responses gather each completion's chunks (two prompts x n=2, interleaved, 5,000 chunks
    each): texts, ids and logprobs in order, usage counting each prompt once."""
    from cluster.openai_http import _drain

    def chunks():
        for step in range(5000):
            for prompt_index in (0, 1):
                for index in (0, 1):
                    last = step == 4999
                    yield prompt_index, {"index": index, "text": f"{prompt_index}{index}{step % 10}",
                                         "token_ids": [step], "logprobs": [{"step": step}],
                                         "finish_reason": "length" if last else None, "completion_tokens": 5000,
                                         "prompt_tokens": 7, "cached_tokens": 3}

    async def stream():
        for item in chunks():
            yield item

    completions, usage = asyncio.run(_drain(stream(), 2))
    assert len(completions) == 4
    for choice, c in enumerate(completions):
        tag = f"{choice // 2}{choice % 2}"
        assert c.text == "".join(f"{tag}{s % 10}" for s in range(5000))
        assert c.token_ids == list(range(5000)) and c.logprobs[-1] == {"step": 4999}
        assert (c.finish_reason, c.completion_tokens) == ("length", 5000)
    assert usage.body()["prompt_tokens"] == 14 and usage.body()["completion_tokens"] == 20000


def test_openai_sampling_mapping():
    from cluster.openai_http import ChatCompletionRequest, CompletionRequest

    req = CompletionRequest(model="m", prompt="hi", max_tokens=4, temperature=0, stop="x", top_k=5)
    assert req.sampling(None) == {"max_tokens": 4, "temperature": 0, "stop": ["x"], "top_k": 5}
    # no max_tokens: until the context ends (None), not SamplingParams' Python default
    assert CompletionRequest(model="m", prompt="hi").sampling(None) == {"max_tokens": None}
    req = CompletionRequest(model="m", prompt="hi", n=2, logit_bias={"7": 5.5}, prompt_logprobs=1)
    assert req.sampling(None) == {"max_tokens": None, "n": 2, "logit_bias": {"7": 5.5}, "prompt_logprobs": 1}
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]}])
    assert chat.messages[0].text(0) == "ab"


@pytest.mark.parametrize("extra, structured", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     {"json_schema": {"type": "object"}}),
    ({"structured_outputs": {"regex": "a+"}}, {"regex": "a+"}),
    ({"structured_outputs": {"choice": ["a", "b"]}}, {"choice": ["a", "b"]}),
    ({"guided_json": {"type": "integer"}}, {"json_schema": {"type": "integer"}}),
    ({"guided_grammar": "start: \"a\""}, {"grammar": "start: \"a\""}),
])
def test_openai_structured_output_fields(extra, structured):
    from cluster.openai_http import ChatCompletionRequest

    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **extra)
    assert req.sampling(None).get("structured") == structured


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"structured_outputs": {"xml": "x"}}, "structured_outputs.xml"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
])
def test_openai_structured_output_errors_name_the_field(extra, field):
    from cluster.openai_http import ChatCompletionRequest

    with pytest.raises(ApiError) as e:
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **extra).sampling(None)
    assert e.value.field == field and e.value.message.startswith(field)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", True), ("max_tokens", "8"), ("n", 2.0), ("seed", False), ("temperature", True),
    ("top_p", "0.5"), ("stream", "yes"), ("echo", 1), ("stop_token_ids", [True]), ("logit_bias", {"5": True}),
    ("prompt", [True, 2]), ("logprobs", True),
])
def test_openai_numbers_and_flags_are_strict_as_openais(field, value):
    """pydantic's lax mode read `"max_tokens": true` as 1, "8" as 8 and "yes" as true; OpenAI refuses them."""
    from pydantic import ValidationError

    from cluster.openai_http import CompletionRequest

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", field: value})
    assert {err["loc"][0] for err in e.value.errors()} == {field}


def test_openai_float_fields_still_take_integers():
    from cluster.openai_http import ChatCompletionRequest

    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                "temperature": 1, "logit_bias": {"5": -100}, "logprobs": True,
                                                "top_logprobs": 2})
    assert req.temperature == 1.0 and req.logit_bias == {"5": -100.0} and req.logprobs is True


def test_errors_are_renamed_to_the_clients_field_names():
    err = ApiError.invalid("structured.json_schema", "bad schema")
    renamed = err.renamed({"structured": "response_format.json_schema.schema"})
    assert renamed.field == "response_format.json_schema.schema.json_schema"
    assert renamed.message == "response_format.json_schema.schema.json_schema: bad schema"
    top = ApiError.invalid("logprobs", "must be <= 20").renamed({"logprobs": "top_logprobs"})
    assert (top.field, top.message) == ("top_logprobs", "top_logprobs: must be <= 20")
    assert ApiError.invalid("logprobsx", "m").renamed({"logprobs": "top_logprobs"}).field == "logprobsx"


def test_chat_tools_constrain_and_parse():
    import asyncio

    from cluster.chat_tools import ChatTools

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    assert ChatTools.from_request(tools, "none").active is False
    assert ChatTools.from_request(tools, "auto").constrain({"n": 1}) == {"n": 1}
    forced = ChatTools.from_request(tools, "required").constrain({})
    assert forced["structured"]["json_schema"]["properties"]["name"] == {"const": "get_weather"}
    with pytest.raises(ApiError) as e:
        ChatTools.from_request(tools, "required").constrain({"structured": {"json_object": True}})
    assert e.value.field == "tool_choice"
    with pytest.raises(ApiError) as e:
        ChatTools.from_request(tools, {"type": "function", "function": {"name": "nope"}})
    assert e.value.field == "tool_choice.function.name"

    def chunk(index, text, finish=None):
        return {"index": index, "text": text, "token_ids": [1], "logprobs": None, "finish_reason": finish,
                "prompt_tokens": 3, "cached_tokens": 0, "completion_tokens": 1}

    async def run(chunks):
        async def stream():
            for c in chunks:
                yield c
        return [c async for c in ChatTools.from_request(tools, "auto").parse(stream())]

    out = asyncio.run(run([chunk(0, '{"name": "get_weather", '), chunk(1, "Hello"),
                           chunk(0, '"parameters": {"city": "Paris"}}', "stop"), chunk(1, " there", "stop")]))
    assert [c["text"] for c in out] == ["", "Hello", "", " there"]
    calls = out[2]["tool_calls"]
    assert out[2]["finish_reason"] == "tool_calls" and out[3]["finish_reason"] == "stop"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calls[0]["id"].startswith("call_") and "tool_calls" not in out[3]
    # held text that turns out not to be a call is sent as content at the end
    out = asyncio.run(run([chunk(0, "{not a call"), chunk(0, "}", "length")]))
    assert "".join(c["text"] for c in out) == "{not a call}" and out[-1]["finish_reason"] == "length"


def test_auth_key_file_is_read_and_rotated(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("# herd API keys\nfirst\n\n")
    auth = ApiKeyAuth([], str(key_file))
    auth.check([("x-api-key", "first")])
    with pytest.raises(ApiError):
        auth.check([("x-api-key", "second")])
    key_file.write_text("second\n")
    import os
    os.utime(key_file, (1, 1))  # a new mtime, as a Secret update gives
    monkeypatch.setattr(ApiKeyAuth, "KEY_FILE_CHECK_S", 0.0)
    auth.check([("x-api-key", "second")])
    with pytest.raises(ApiError):
        auth.check([("x-api-key", "first")])


def test_auth_empty_key_file_fails_closed(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("\n")
    with pytest.raises(ApiError):
        ApiKeyAuth([], str(key_file)).check([("x-api-key", "anything")])


# ---- application options ---------------------------------------------------------------------------------
def _cfg(**extra):
    from cluster.config import ClusterConfig

    models = [
        {"name": "big", "path": "/m/big", "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
         "resources_per_shard": {"GPU": 1}, "placement_strategy": "STRICT_PACK"},
        {"name": "small", "path": "/m/small", "resources_per_shard": {"CPU": 2, "GPU": 1, "accel": 1},
         "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
    ]
    return ClusterConfig.from_dict({"models": models, **extra})


def test_tp_pp_replica_owns_a_placement_group():
    from cluster.app import DRIVER_CPUS, model_deployment_options

    opts = model_deployment_options(_cfg().models[0])
    assert opts["placement_group_bundles"] == [{"CPU": DRIVER_CPUS}] + [{"GPU": 1}] * 4
    assert opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == {"num_cpus": DRIVER_CPUS}  # fits bundle 0
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    assert opts["request_router_config"]["request_router_class"] == "cluster.routing:PrefixCacheRouter"


def test_whole_model_replica_reserves_its_shard_and_autoscales_with_the_llm_policy():
    from cluster.app import model_deployment_options

    opts = model_deployment_options(_cfg().models[1])
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1, "resources": {"accel": 1}}
    assert "placement_group_bundles" not in opts and "num_replicas" not in opts
    assert opts["autoscaling_config"]["policy"] == {"policy_function": "cluster.autoscaling:llm_autoscaling_policy"}
    assert opts["graceful_shutdown_timeout_s"] > 0
    # herd's report interval and window, not Serve's 10 s / 30 s, which saw a burst up to 10 s late
    assert opts["autoscaling_config"]["metrics_interval_s"] == 2.0
    assert opts["autoscaling_config"]["look_back_period_s"] == 10.0
    from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
    ServeAutoscalingConfig(**{k: v for k, v in opts["autoscaling_config"].items() if k != "policy"})  # Serve takes it


def test_only_a_whole_model_replica_runs_its_engine_in_a_process():
    from cluster.app import model_spec
    from cluster.deployment import runs_engine_process

    big, small = _cfg().models
    assert runs_engine_process(model_spec(small))
    assert not runs_engine_process(model_spec(big))  # a TP x PP driver needs the replica's Ray context
    assert not runs_engine_process(model_spec(small.model_copy(update={"engine_process": False})))


def test_stopping_replicas_look_for_the_end_of_their_streams_sooner_than_serves_2s():
    """Serve sleeps graceful_shutdown_wait_loop_s before a stopping replica first counts its requests: an idle
    model or ingress replica being scaled down must not hold its resources for Serve's default 2 s."""
    from ray.serve._private.config import DeploymentConfig

    from cluster.app import GRACEFUL_SHUTDOWN_WAIT_LOOP_S, ingress_deployment_options, model_deployment_options

    cfg = _cfg()
    serve_default = DeploymentConfig().graceful_shutdown_wait_loop_s
    assert GRACEFUL_SHUTDOWN_WAIT_LOOP_S < serve_default
    for opts in [ingress_deployment_options(cfg)] + [model_deployment_options(m) for m in cfg.models]:
        assert opts["graceful_shutdown_wait_loop_s"] == GRACEFUL_SHUTDOWN_WAIT_LOOP_S
        assert opts["graceful_shutdown_timeout_s"] > opts["graceful_shutdown_wait_loop_s"]


def test_serve_start_options():
    from cluster.app import GRPC_SERVICER_FUNCTIONS, serve_start_options

    opts = serve_start_options(_cfg(host="10.0.0.5", grpc_port=9100, http_port=8100, request_timeout_s=30,
                                    api_keys=["k"], tls={"cert_file": "/tls/c.pem", "key_file": "/tls/k.pem"}))
    http, grpc_opts = opts["http_options"], opts["grpc_options"]
    assert (http.host, http.port, http.ssl_certfile, http.ssl_keyfile) == ("10.0.0.5", 8100, "/tls/c.pem", "/tls/k.pem")
    assert (grpc_opts.port, grpc_opts.grpc_servicer_functions) == (9100, GRPC_SERVICER_FUNCTIONS)
    assert http.request_timeout_s == grpc_opts.request_timeout_s == 30
    assert grpc_opts.enable_reflection is False  # off unless the config enables it


def test_reflection_adds_the_v1_servicer_last():
    from cluster.app import GRPC_SERVICER_FUNCTIONS, REFLECTION_SERVICER_FUNCTIONS, serve_start_options

    grpc_opts = serve_start_options(_cfg(enable_reflection=True))["grpc_options"]
    assert grpc_opts.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS + REFLECTION_SERVICER_FUNCTIONS
    assert grpc_opts.enable_reflection is True  # Serve's own v1alpha stays on beside herd's v1


def test_request_timeout_is_finite_by_default():
    from cluster.app import serve_start_options

    opts = serve_start_options(_cfg())
    assert 0 < opts["grpc_options"].request_timeout_s == opts["http_options"].request_timeout_s < float("inf")


def test_load_config_from_args(tmp_path):
    import yaml

    from cluster.app import load_config

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"models": [{"name": "m", "path": "/m"}]}))
    assert load_config({"config": str(path)}).models[0].name == "m"
    assert load_config({"models": [{"name": "m", "path": "/m"}]}).models[0].name == "m"
    with pytest.raises(ValueError):
        load_config({"config": str(path), "models": []})


def test_tokens_merged_with_the_first_count_as_inter_token_gaps():
    """Every token after a request's first is one inter-token gap (vLLM's count), also when the replica's loop
    fell behind and the first chunk carries several tokens: those are gaps of 0 s."""
    import asyncio
    from types import SimpleNamespace

    from cluster.deployment import ModelServer

    class Recorder:
        def __init__(self):
            self.first, self.gaps = 0, []

        def on_request(self):
            pass

        def on_first_token(self, seconds):
            self.first += 1

        def on_token(self, seconds, num_tokens=1):
            self.gaps += [seconds / max(num_tokens, 1)] * max(num_tokens, 0)

        def on_finish(self, *args, **kwargs):
            pass

    def delta(ids, finished=False):
        return SimpleNamespace(index=0, token_ids=ids, text="", logprobs=None, finish_reason="length" if finished
                               else None, num_prompt_tokens=3, num_cached_tokens=0, prompt_logprobs=None,
                               scheduled_at=None, finished=finished)

    class Engine:
        def validate(self, prompt, params):
            pass

        async def generate(self, prompt, params, request_id):
            yield delta([5, 6, 7])               # the first three tokens, merged
            yield delta([8], finished=True)

    server = object.__new__(ModelServer)
    server.name, server.engine, server.metrics = "m", Engine(), Recorder()

    async def run():
        return [c async for c in server._chunks([1, 2, 3], {"max_tokens": 4}, "r1")]

    chunks = asyncio.run(run())
    assert [c["completion_tokens"] for c in chunks] == [3, 4]
    assert server.metrics.first == 1 and len(server.metrics.gaps) == 3      # 4 tokens: 3 gaps
    assert server.metrics.gaps[:2] == [0.0, 0.0]
