"""herd's serving cluster end to end: real Ray + Serve on 127.0.0.1, a real gRPC channel and the openai client.

One cluster for the whole module (start-up dominates on 2 cores): a TP2×PP2 model ("big", Llama-2-70B-shaped),
an autoscaled single-shard model ("mid", Llama-3-8B-shaped) and a single-shard model with a tiny engine queue
("small", Llama-3.2-1B-shaped: max_num_seqs 1, max_queued_requests 1) for the queue-full case. API keys are on.
The shard-kill test runs last: it takes the big model down and waits for Serve to bring it back.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest

from cluster.client import HerdClient, collect
from cluster.pb import inference_pb2 as pb
from cluster.pb import inference_pb2_grpc as pb_grpc
from tests.serve_fixtures import running_herd_cluster, wait_for

pytestmark = pytest.mark.slow

API_KEY = "herd-test-key-0123"
SHAPES = {"big": "llama2-70b-mini", "mid": "llama3-8b-mini", "small": "llama32-1b-mini"}
MAX_MODEL_LEN = {"big": 256, "mid": 512, "small": 128}
KV_BYTES = 8 << 20  # per shard; small pools keep 6 engines' memory low
GREEDY = {"temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from workers.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("serve-ckpt")
    return {name: str(write_demo_checkpoint(root / shape, shape, dtype="float32")) for name, shape in SHAPES.items()}


@pytest.fixture(scope="module")
def cluster(checkpoints):
    common = {"resources_per_shard": {"CPU": 0.25}, "kv_cache_memory": KV_BYTES, "health_check_period_s": 1.0,
              "health_check_timeout_s": 30.0}
    config = {
        "api_keys": [API_KEY],
        "enable_reflection": True,
        "models": [
            {"name": "big", "path": checkpoints["big"], "tensor_parallel_size": 2, "pipeline_parallel_size": 2,
             "max_model_len": MAX_MODEL_LEN["big"], **common},
            {"name": "mid", "path": checkpoints["mid"], "max_model_len": MAX_MODEL_LEN["mid"],
             "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}, **common},
            {"name": "small", "path": checkpoints["small"], "max_model_len": MAX_MODEL_LEN["small"],
             "max_num_seqs": 1, "max_queued_requests": 1, "max_ongoing_requests": 8, **common},
        ],
    }
    started = time.monotonic()
    with running_herd_cluster(config, num_cpus=4, api_key=API_KEY) as c:
        print(f"herd test cluster up in {time.monotonic() - started:.1f}s")
        yield c


@pytest.fixture(scope="module")
def engines(checkpoints):
    """In-process engines (TP1) on the same checkpoints: the reference for exact tokens."""
    from workers import Engine

    out = {name: Engine.from_pretrained(path, max_model_len=MAX_MODEL_LEN[name], kv_cache_memory=KV_BYTES)
           for name, path in checkpoints.items()}
    yield out
    for e in out.values():
        e.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    with HerdClient(cluster.grpc_address, api_key=API_KEY) as c:
        yield c


def reference(engine, prompt_ids, **sampling):
    from workers import SamplingParams

    out = engine.generate([prompt_ids], SamplingParams(**sampling))[0]
    return out.token_ids, out.text, out.finish_reason


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        result = call()
        if not isinstance(result, pb.TokenizeResponse | pb.ListModelsResponse):
            list(result)
    return e.value


# ---- API surface ---------------------------------------------------------------------------------------
def test_list_models(client):
    models = {m.name: m for m in client.list_models(timeout=30).models}
    assert set(models) == {"big", "mid", "small"}
    assert (models["big"].tensor_parallel_size, models["big"].pipeline_parallel_size) == (2, 2)
    assert models["mid"].autoscaling and not models["small"].autoscaling
    for name, m in models.items():
        assert m.max_model_len == MAX_MODEL_LEN[name] and m.vocab_size > 0 and m.block_size > 0


def test_health_overall_and_per_model(client):
    assert client.health("", timeout=30) == "SERVING"
    assert client.health("herd.v1.Inference", timeout=30) == "SERVING"
    for name in SHAPES:
        assert client.health(name, timeout=30) == "SERVING"
    err = rpc_error(lambda: client.health("no-such-model", timeout=30))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def _reflect(channel, service: str, request) -> list:
    """Responses of one ServerReflectionInfo call on `service` (v1 and v1alpha share their messages)."""
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
    return list(call(iter([request]), timeout=30))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_and_describes_the_services(cluster, version):
    """grpcurl / Postman ask grpc.reflection.v1 first, older clients v1alpha: both answer, and both can
    describe herd's service (the file holding it, with its request and response messages)."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    service = f"grpc.reflection.{version}.ServerReflection"
    with cluster.channel() as ch:
        [listed] = _reflect(ch, service, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        [described] = _reflect(ch, service, reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="herd.v1.Inference"))
    assert {"herd.v1.Inference", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    herd_file = next(f for f in files if f.package == "herd.v1")
    assert {m.name for m in herd_file.service[0].method} >= {"Generate", "Chat", "Tokenize", "ListModels"}
    assert "GenerateRequest" in {m.name for m in herd_file.message_type}


@pytest.mark.parametrize("model", ["big", "mid", "small"])
def test_generate_text_matches_in_process_engine(client, engines, model):
    text = "The quick brown fox jumps over the lazy dog"
    ids = engines[model].tokenizer.encode(text, bos=True)
    want_ids, want_text, _ = reference(engines[model], ids, max_tokens=12, **GREEDY)
    responses = list(client.generate(model, text, max_tokens=12, timeout=120, **GREEDY))
    got_ids = [t for r in responses for t in r.token_ids]
    assert got_ids == want_ids
    assert "".join(r.text for r in responses) == want_text
    assert len(responses) > 1, "tokens are streamed, not sent at once"
    assert all(r.finish_reason == "" for r in responses[:-1]) and responses[-1].finish_reason == "length"
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 12)


def test_generate_token_ids_and_request_id(client, engines):
    ids = [engines["mid"].tokenizer.bos_id, 1000, 2000, 3000, 4000, 5000]
    want_ids, _, _ = reference(engines["mid"], ids, max_tokens=6, **GREEDY)
    responses = list(client.generate("mid", ids, max_tokens=6, request_id="abc-1", timeout=120, **GREEDY))
    assert [t for r in responses for t in r.token_ids] == want_ids
    assert {r.request_id for r in responses} == {"abc-1"}


def test_generate_logprobs(client):
    responses = list(client.generate("small", "Hello", max_tokens=3, logprobs=2, timeout=120, **GREEDY))
    entries = [lp for r in responses for lp in r.logprobs]
    tokens = [t for r in responses for t in r.token_ids]
    assert [e.token_id for e in entries] == tokens
    for e in entries:
        assert len(e.top_logprobs) >= 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.top_logprobs[0].token_id == e.token_id  # greedy: the sampled token is the most likely
        assert e.logprob <= 0.0


@pytest.mark.parametrize("model", ["big", "mid"])
def test_chat_applies_the_models_chat_format(client, engines, model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    prompt_ids = engines[model].tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    want_ids, want_text, _ = reference(engines[model], prompt_ids, max_tokens=8, **GREEDY)
    ids, text, last = collect(client.chat(model, messages, max_tokens=8, timeout=120, **GREEDY))
    assert (ids, text) == (want_ids, want_text)
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert list(client.tokenize(model, messages=messages, timeout=30).token_ids) == prompt_ids


def test_tokenize(client, engines):
    resp = client.tokenize("mid", "Hello world", timeout=30)
    assert list(resp.token_ids) == engines["mid"].tokenizer.encode("Hello world", bos=True)
    assert resp.max_model_len == MAX_MODEL_LEN["mid"]
    assert "".join(resp.tokens[1:]).strip() == "Hello world"
    no_bos = client.tokenize("mid", "Hello world", add_bos=False, timeout=30)
    assert list(no_bos.token_ids) == list(resp.token_ids[1:])


def test_prefix_cache_hit_is_reported(client):
    prompt = list(range(1000, 1100))  # 100 tokens: several full blocks
    collect(client.generate("mid", prompt, max_tokens=2, timeout=120, **GREEDY))
    _, _, last = collect(client.generate("mid", prompt + [7, 8], max_tokens=2, timeout=120, **GREEDY))
    assert last.usage.cached_tokens >= 64


# ---- status codes --------------------------------------------------------------------------------------------
def test_unknown_model_is_not_found(client):
    err = rpc_error(lambda: client.generate("llama-404", "hi", timeout=30))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "llama-404" in err.details()


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "hi", "temperature": -1.0}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "text"),
    ({"prompt": []}, "token_ids"),
    ({"prompt": [5, 10 ** 9]}, "token_ids"),
    ({"prompt": [5] * MAX_MODEL_LEN["small"]}, "token_ids"),
])
def test_invalid_arguments_name_the_field(client, kwargs, field):
    prompt = kwargs.pop("prompt")
    err = rpc_error(lambda: client.generate("small", prompt, timeout=30, **kwargs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert field in err.details()


def test_prompt_too_long_says_so(client):
    err = rpc_error(lambda: client.generate("small", [5] * 500, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_model_len" in err.details()


def test_missing_prompt_and_bad_chat_role(cluster):
    with cluster.channel() as ch:
        stub = pb_grpc.InferenceStub(ch)
        md = [("x-api-key", API_KEY)]
        err = rpc_error(lambda: stub.Generate(pb.GenerateRequest(model="small"), metadata=md, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.details()
        bad = pb.ChatRequest(model="small", messages=[pb.ChatMessage(role="wizard", content="hi")])
        err = rpc_error(lambda: stub.Chat(bad, metadata=md, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in err.details()
        # Bytes that are no GenerateRequest: refused by the proxy, not grpc's UNKNOWN.
        raw = ch.unary_stream("/herd.v1.Inference/Generate", request_serializer=bytes, response_deserializer=bytes)
        err = rpc_error(lambda: raw(b"\xff\xff\xff", metadata=md, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in err.details()


@pytest.mark.parametrize("metadata", [[], [("authorization", "Bearer wrong-key")], [("x-api-key", "nope")]])
def test_api_key_required(cluster, metadata):
    with cluster.channel() as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(model="small", text="hi")
        err = rpc_error(lambda: stub.Generate(req, metadata=metadata, timeout=30))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert API_KEY not in err.details()
        err = rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=30))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        # x-api-key is accepted as well as the bearer token
        ok = stub.ListModels(pb.ListModelsRequest(), metadata=[("x-api-key", API_KEY)], timeout=30)
        assert len(ok.models) == 3


def test_queue_full_is_resource_exhausted(cluster, client):
    start = cluster.model_stats("small")
    # One running (max_num_seqs 1) and one waiting (max_queued_requests 1) fill the engine.
    running = client.generate("small", "one", max_tokens=120, timeout=120, **GREEDY)
    next(iter(running))
    waiting = client.generate("small", "two", max_tokens=120, timeout=120, **GREEDY)
    waiter = threading.Thread(target=lambda: list(_swallow(waiting)), daemon=True)
    waiter.start()
    wait_for(lambda: cluster.model_stats("small")["num_waiting"] == 1)
    err = rpc_error(lambda: client.generate("small", "three", max_tokens=4, timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()
    waiting.cancel()
    waiter.join(timeout=30)
    wait_for(lambda: cluster.model_stats("small")["kv_blocks_free"] == start["kv_blocks_free"])
    # and the model serves again
    assert collect(client.generate("small", "four", max_tokens=3, timeout=60, **GREEDY))[2].finish_reason == "length"


def _swallow(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return


def test_deadline_exceeded_aborts_the_sequence(cluster, client):
    start = cluster.model_stats("mid")["kv_blocks_free"]
    err = rpc_error(lambda: client.generate("mid", "a long story", max_tokens=400, timeout=1.0, **GREEDY))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: cluster.model_stats("mid")["num_running"] == 0)
    wait_for(lambda: cluster.model_stats("mid")["kv_blocks_free"] == start)


@pytest.mark.parametrize("model", ["mid", "big"])
def test_cancelled_stream_returns_kv_blocks(cluster, client, model):
    start = cluster.model_stats(model)["kv_blocks_free"]
    stream = client.generate(model, "Tell me everything", max_tokens=MAX_MODEL_LEN[model] - 20, timeout=120,
                             **GREEDY)
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert cluster.model_stats(model)["kv_blocks_free"] < start  # the sequence holds blocks while it runs
    stream.cancel()
    wait_for(lambda: cluster.model_stats(model)["num_running"] == 0)
    wait_for(lambda: cluster.model_stats(model)["kv_blocks_free"] == start)


# ---- OpenAI-compatible HTTP ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oai(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_openai_models(oai):
    import openai

    assert {m.id for m in oai.models.list()} == {"big", "mid", "small"}
    assert oai.models.retrieve("mid").id == "mid"
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("nope")
    assert e.value.body["code"] == "model_not_found" and "big, mid, small" in e.value.body["message"]


def test_http_errors_of_any_origin_have_openai_bodies(cluster):
    import httpx

    key = {"authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=cluster.http_url, headers=key, timeout=60) as http:
        no_route = http.post("/v2/completions", json={})
        wrong_method = http.get("/v1/completions")
        not_utf8 = http.post("/v1/completions", content=b'{"model": "small", "prompt": "\xff\xfe"}',
                             headers={"content-type": "application/json"})
    assert no_route.status_code == 404 and no_route.json()["error"]["message"] == "no route POST /v2/completions"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert not_utf8.status_code == 400 and not_utf8.json()["error"]["param"] == "body"


def test_openai_completions(oai, engines):
    ids = engines["mid"].tokenizer.encode("Once upon a time", bos=True)
    _, want_text, _ = reference(engines["mid"], ids, max_tokens=8, **GREEDY)
    r = oai.completions.create(model="mid", prompt="Once upon a time", max_tokens=8, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].text == want_text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 8)
    chunks = list(oai.completions.create(model="mid", prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want_text
    assert chunks[-1].usage.completion_tokens == 8
    assert len([c for c in chunks if c.choices]) > 1


def test_openai_chat_completions(oai, engines):
    messages = [{"role": "user", "content": "Say hi."}]
    prompt_ids = engines["big"].tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    _, want_text, _ = reference(engines["big"], prompt_ids, max_tokens=6, **GREEDY)
    r = oai.chat.completions.create(model="big", messages=messages, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want_text
    assert r.usage.prompt_tokens == len(prompt_ids)
    r = oai.chat.completions.create(model="big", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                    top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content) == want_text
    stream = oai.chat.completions.create(model="big", messages=messages, max_tokens=6, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_openai_error_statuses(cluster, oai):
    import openai

    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model="small", prompt="hi", max_tokens=2, temperature=-3)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="small", messages=[{"role": "user", "content": "x" * 2000}], max_tokens=2)
    bad = openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_openai_queue_full_is_429(cluster, client, oai):
    import openai

    running = client.generate("small", "one", max_tokens=120, timeout=120, **GREEDY)
    next(iter(running))
    waiting = client.generate("small", "two", max_tokens=120, timeout=120, **GREEDY)
    waiter = threading.Thread(target=lambda: list(_swallow(waiting)), daemon=True)
    waiter.start()
    try:
        wait_for(lambda: cluster.model_stats("small")["num_waiting"] == 1)
        with pytest.raises(openai.RateLimitError):
            oai.completions.create(model="small", prompt="three", max_tokens=2, stream=True)
    finally:
        running.cancel()
        waiting.cancel()
        waiter.join(timeout=30)


# ---- a shard group goes down (last: it takes "big" out until Serve replaces the replica) -----------------------
def test_shard_group_down_is_unavailable_and_recovers(cluster, client, engines):
    pids = cluster.shard_worker_pids()
    assert len(pids) == 4                        # "big" (TP2 x PP2) is the only shard group
    os.kill(pids[-1], signal.SIGKILL)
    err = rpc_error(lambda: client.generate("big", "hello", max_tokens=50, timeout=60, **GREEDY))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    # The rest of the cluster keeps serving meanwhile...
    assert collect(client.generate("mid", "still here", max_tokens=2, timeout=60, **GREEDY))[2].finish_reason
    # ...and Serve's health check replaces the broken replica, which serves exact tokens again.
    ids = engines["big"].tokenizer.encode("back again", bos=True)
    want_ids, _, _ = reference(engines["big"], ids, max_tokens=4, **GREEDY)

    def recovered():
        try:
            return collect(client.generate("big", ids, max_tokens=4, timeout=60, **GREEDY))[0] == want_ids
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e.details()
            return False
    wait_for(recovered, timeout_s=180, interval_s=2.0)
