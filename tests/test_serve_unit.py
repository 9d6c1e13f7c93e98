"""Fast tests of the serving edge without Ray: error mapping, API-key auth, proto/OpenAI request conversion."""
from __future__ import annotations

import pickle

import grpc
import pytest

from cluster.errors import ApiError, error_to_dict, to_api_error
from cluster.ingress import ApiKeyAuth, sampling_from_proto
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


def test_sampling_dict_builds_workers_params():
    from workers import SamplingParams

    d = sampling_from_proto(pb.SamplingParams(temperature=0.0, max_tokens=5, top_k=3))
    p = SamplingParams.from_dict(d)
    assert (p.temperature, p.max_tokens, p.top_k, p.top_p) == (0.0, 5, 3, 1.0)


def test_openai_sampling_mapping():
    from cluster.openai_http import ChatCompletionRequest, CompletionRequest

    req = CompletionRequest(model="m", prompt="hi", max_tokens=4, temperature=0, stop="x", top_k=5)
    assert req.sampling(None) == {"max_tokens": 4, "temperature": 0, "stop": ["x"], "top_k": 5}
    with pytest.raises(ApiError) as e:
        CompletionRequest(model="m", prompt="hi", n=2).sampling(None)
    assert e.value.field == "n"
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                  {"type": "text", "text": "b"}]}])
    assert chat.messages[0].text(0) == "ab"


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
