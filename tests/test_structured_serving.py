"""Structured outputs, tool calls, n > 1, logit_bias and prompt logprobs through a real herd cluster: real Ray +
Serve on 127.0.0.1, the `openai` client on the HTTP port and herd's gRPC client, dozens of requests at once.
"l3" ships the real Llama 3.1 Instruct chat template (rendered with Jinja, tools included), "l2" is the Llama 2
demo with the built-in format.

The models are random-weight: they know nothing, so every well-formed answer below is the grammar's doing.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import jsonschema
import pytest

from cluster.client import HerdClient, collect
from tests.checkpoints import make_chat_checkpoint
from tests.serve_fixtures import running_herd_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

API_KEY = "structured-test-key"
MAX_MODEL_LEN = 512
SEATS = 32
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "pet"],
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
                         "pet": {"type": "object", "required": ["kind"], "additionalProperties": False,
                                 "properties": {"kind": {"enum": ["cat", "dog"]}}}}}
WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]}}}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"enum": ["Paris", "Rome"]}}}}},
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from workers.demo import write_demo_checkpoint

    root = tmp_path_factory.mktemp("structured")
    common = {"resources_per_shard": {"CPU": 0.25}, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": SEATS,
              "kv_cache_memory": 48 << 20}
    config = {"api_keys": [API_KEY], "models": [
        # Llama 3 with the real Llama 3.1 Instruct Jinja template in tokenizer_config.json: tools are rendered by it
        {"name": "l3", "path": str(make_chat_checkpoint(root, "l3", "llama3")), **common},
        {"name": "l2", "path": str(write_demo_checkpoint(root / "l2", "llama2-70b-mini", dtype="float32")), **common},
    ]}
    with running_herd_cluster(config, num_cpus=4, api_key=API_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def oai(cluster):
    import openai

    return openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(cluster):
    with HerdClient(cluster.grpc_address, api_key=API_KEY) as c:
        yield c


def in_parallel(fn, args, workers: int = SEATS) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, args))


# ---- OpenAI: structured outputs ---------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["l3", "l2"])
def test_json_schema_answers_all_validate(oai, model):
    """Dozens of sampled (temperature 1, seeded) json_schema requests at once: every answer parses and
    validates, and ends with "stop" because the grammar completed."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def ask(seed: int):
        return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": f"person {seed}"}],
                                           response_format=fmt, temperature=1.0, seed=seed, max_tokens=200)

    answers = in_parallel(ask, range(24))
    for r in answers:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({r.choices[0].message.content for r in answers}) > 1  # sampled, not one forced answer


def test_json_object_regex_and_choice(oai):
    obj = oai.chat.completions.create(model="l3", messages=[{"role": "user", "content": "json"}],
                                      response_format={"type": "json_object"}, temperature=0.7, seed=1,
                                      max_tokens=MAX_MODEL_LEN - 64)
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # a random model may write one long string: cut by max_tokens, and said so
        assert obj.choices[0].finish_reason == "length" and obj.choices[0].message.content.startswith("{")
    regex = r"(19|20)\d\d-(0[1-9]|1[0-2])-[0-2]\d"
    for seed in range(4):
        r = oai.completions.create(model="l2", prompt="Date:", max_tokens=50, temperature=1.0, seed=seed,
                                   extra_body={"structured_outputs": {"regex": regex}})
        assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    r = oai.chat.completions.create(model="l3", messages=[{"role": "user", "content": "sentiment?"}],
                                    temperature=1.0, seed=3, extra_body={"guided_choice": choices})
    assert r.choices[0].message.content in choices


def test_bad_schema_and_grammar_are_400_naming_the_field(cluster):
    headers = {"authorization": f"Bearer {API_KEY}"}
    msgs = [{"role": "user", "content": "x"}]
    with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={"model": "l3", "messages": msgs, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"].startswith("response_format.json_schema.schema"), r.text
        r = http.post("/v1/completions", json={"model": "l3", "prompt": "x",
                                               "structured_outputs": {"grammar": "start: ((("}})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("structured_outputs"), r.text
        r = http.post("/v1/completions", json={"model": "l3", "prompt": "x", "guided_regex": "(unclosed"})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("guided_regex"), r.text


# ---- OpenAI: tools -------------------------------------------------------------------------------------------
def test_required_tool_calls_always_parse_and_a_tool_result_turn_follows(oai):
    def ask(seed: int):
        return oai.chat.completions.create(
            model="l3", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=WEATHER_TOOLS, tool_choice="required", temperature=1.0, seed=seed, max_tokens=100)

    for r in in_parallel(ask, range(12)):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        [call] = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in {"get_weather", "get_time"}
        assert json.loads(call.function.arguments)["city"] in {"Paris", "Rome", "Oslo"}
    # a named function is the one called; then the tool's result goes back and the model answers
    r = oai.chat.completions.create(
        model="l3", messages=[{"role": "user", "content": "Time in Rome?"}], tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=60)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    follow = oai.chat.completions.create(
        model="l3", tools=WEATHER_TOOLS, tool_choice="none", max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "Time in Rome?"},
                  {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                  {"role": "tool", "tool_call_id": call.id, "content": '{"time": "12:00"}'}])
    assert follow.choices[0].message.tool_calls is None and follow.usage.completion_tokens > 0


def test_streamed_tool_calls(oai):
    stream = oai.chat.completions.create(
        model="l3", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=WEATHER_TOOLS,
        tool_choice="required", temperature=0.8, seed=7, max_tokens=100, stream=True)
    calls, finish, content = [], None, ""
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and content == ""
    [call] = calls
    assert call.function.name in {"get_weather", "get_time"} and "city" in json.loads(call.function.arguments)


def test_malformed_tools_are_400_naming_the_field(cluster):
    headers = {"authorization": f"Bearer {API_KEY}"}
    msgs = [{"role": "user", "content": "x"}]
    cases = [
        ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], None,
         "tools[0].function.parameters.type"),
        (WEATHER_TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        (None, "required", "tool_choice"),
    ]
    with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=60) as http:
        for tools, choice, param in cases:
            body = {"model": "l3", "messages": msgs, "tools": tools, "tool_choice": choice}
            r = http.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---- OpenAI: n, logit_bias, prompt logprobs, defaults -------------------------------------------------------
def test_n_completions_share_one_prompt(oai):
    r = oai.completions.create(model="l2", prompt="Once upon a time", n=3, max_tokens=8, temperature=1.0, seed=11)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == sum(1 for c in r.choices for _ in [c]) * 8 or r.usage.completion_tokens > 0
    again = oai.completions.create(model="l2", prompt="Once upon a time", n=3, max_tokens=8, temperature=1.0,
                                   seed=11)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible
    assert len({c.text for c in r.choices}) > 1                            # each its own stream
    # several prompts x n: choice index = prompt_index * n + i
    r = oai.completions.create(model="l2", prompt=["a b", "c d"], n=2, max_tokens=4, temperature=1.0, seed=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    stream = oai.chat.completions.create(model="l3", messages=[{"role": "user", "content": "hi"}], n=3,
                                         max_tokens=6, temperature=1.0, seed=5, stream=True)
    finished = {}
    for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1, 2}


def test_logit_bias_forces_and_bans_tokens(oai, client):
    greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "timeout": 120}
    forced = client.tokenize("l2", "hello", add_bos=False).token_ids[0]
    ids, text, _ = collect(client.generate("l2", "x", logit_bias={forced: 100.0}, **greedy))
    assert ids == [forced] * 4
    # the same bias over HTTP (token ids as JSON object keys) gives the same answer
    r = oai.completions.create(model="l2", prompt="x", max_tokens=4, temperature=0,
                               logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == text
    free, _, _ = collect(client.generate("l2", "x", **greedy))
    banned, _, _ = collect(client.generate("l2", "x", logit_bias={free[0]: -100.0}, **greedy))
    assert free[0] not in banned


def test_prompt_logprobs_and_no_max_tokens_means_until_the_context_ends(cluster, client):
    headers = {"authorization": f"Bearer {API_KEY}"}
    prompt = client.tokenize("l2", "The cat sat on the mat").token_ids
    with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=300) as http:
        r = http.post("/v1/completions", json={"model": "l2", "prompt": list(prompt), "max_tokens": 1,
                                               "prompt_logprobs": 2})
        assert r.status_code == 200, r.text
        plp = r.json()["choices"][0]["prompt_logprobs"]
        assert len(plp) == len(prompt) and plp[0] is None
        for tok, entry in zip(prompt[1:], plp[1:]):
            assert str(tok) in entry and all(v["logprob"] <= 0 for v in entry.values())
        # no max_tokens: the answer runs to the end of the context and says "length"
        r = http.post("/v1/completions", json={"model": "l2", "prompt": list(prompt), "ignore_eos": True,
                                               "temperature": 0})
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - len(prompt)


def test_http_logprobs_at_concurrency_streamed_equal_whole(cluster, client):
    """24 OpenAI requests at once, each asking for logprobs: every prompt as a streamed and a whole (non-streamed)
    completion with prompt_logprobs, and chats both ways with top_logprobs. Long ones are written off the
    ingress's event loop (cluster/raw_json.py), a streamed chunk's few tokens inline; both ways give the same
    tokens, log-probabilities and prompt logprobs, in OpenAI's and vLLM's shapes."""
    headers = {"authorization": f"Bearer {API_KEY}"}
    prompts = [client.tokenize("l2", f"Story {i}: " + "the quick brown fox jumps over the lazy dog " * 12).token_ids
               for i in range(6)]
    assert all(len(p) > 100 for p in prompts)       # (1 + 4) entries per position: past raw_json's inline size
    chats = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(6)]
    greedy = {"temperature": 0, "ignore_eos": True, "max_tokens": 24}

    def events(http: httpx.Client, route: str, body: dict) -> list[dict]:
        with http.stream("POST", route, json=body) as r:
            assert r.status_code == 200, r.read()
            lines = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(ln) for ln in lines[:-1]]

    def completion(job: tuple[int, bool]) -> dict:
        i, stream = job
        body = {"model": "l2", "prompt": list(prompts[i]), "logprobs": 3, "prompt_logprobs": 4, "stream": stream,
                **greedy}
        with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=300) as http:
            if not stream:
                r = http.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                [c] = r.json()["choices"]
                return {"text": c["text"], "plp": c["prompt_logprobs"], **c["logprobs"]}
            chunks = [e["choices"][0] for e in events(http, "/v1/completions", body)]
        return {"text": "".join(c["text"] for c in chunks),
                "plp": next(c["prompt_logprobs"] for c in chunks if c.get("prompt_logprobs")),
                **{k: [x for c in chunks if c["logprobs"] for x in c["logprobs"][k]]
                   for k in ("tokens", "token_logprobs", "top_logprobs")}}

    def chat(job: tuple[int, bool]) -> dict:
        i, stream = job
        body = {"model": "l3", "messages": chats[i], "logprobs": True, "top_logprobs": 3, "stream": stream, **greedy}
        with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=300) as http:
            if not stream:
                r = http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                [c] = r.json()["choices"]
                return {"text": c["message"]["content"], "content": c["logprobs"]["content"]}
            chunks = [e["choices"][0] for e in events(http, "/v1/chat/completions", body)]
        return {"text": "".join(c["delta"].get("content") or "" for c in chunks),
                "content": [x for c in chunks if c["logprobs"] for x in c["logprobs"]["content"]]}

    jobs = [(i, stream) for i in range(6) for stream in (True, False)]
    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        completions = pool.map(completion, jobs)
        chat_answers = pool.map(chat, jobs)
        completions, chat_answers = list(completions), list(chat_answers)

    def close(a: float, b: float) -> bool:
        return abs(a - b) < 1e-3

    for i in range(6):
        streamed, whole = completions[2 * i], completions[2 * i + 1]
        assert streamed["text"] == whole["text"] and streamed["tokens"] == whole["tokens"]
        assert len(whole["tokens"]) == 24 and whole["text"] == "".join(whole["tokens"])
        assert all(map(close, streamed["token_logprobs"], whole["token_logprobs"]))
        assert [sorted(t) for t in streamed["top_logprobs"]] == [sorted(t) for t in whole["top_logprobs"]]
        assert len(whole["plp"]) == len(prompts[i]) and whole["plp"][0] is None and streamed["plp"][0] is None
        for tok, a, b in zip(prompts[i][1:], streamed["plp"][1:], whole["plp"][1:]):
            assert str(tok) in a and a.keys() == b.keys() and 5 <= len(a) <= 6   # the prompt's token + the top 4
            assert all(close(a[k]["logprob"], b[k]["logprob"]) and a[k]["decoded_token"] == b[k]["decoded_token"]
                       for k in a)
        streamed, whole = chat_answers[2 * i], chat_answers[2 * i + 1]
        assert streamed["text"] == whole["text"] and len(whole["content"]) == 24
        assert [e["token"] for e in streamed["content"]] == [e["token"] for e in whole["content"]]
        for a, b in zip(streamed["content"], whole["content"]):
            assert close(a["logprob"], b["logprob"]) and len(a["top_logprobs"]) == len(b["top_logprobs"]) == 3
            assert bytes(a["bytes"]).decode("utf-8", "replace") == a["token"] or a["token"] == "\ufffd"


def test_openai_error_fidelity(cluster):
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=60) as http:
        r = http.post("/v1/chat/completions", content=b'{"model": "l3", "messages": [}')
        err = r.json()["error"]
        assert r.status_code == 400 and "not valid JSON" in err["message"] and err["param"] is None, r.text
        r = http.post("/v1/chat/completions", json={"model": "l3", "messages": [{"role": "bot", "content": "x"}]})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "messages[0].role", r.text
        assert err["message"].count("messages[0].role") == 1 and "bot" in err["message"]
        r = http.post("/v1/chat/completions", json={"model": "l3", "messages": [{"role": "user", "content": "x"}],
                                                    "logprobs": True, "top_logprobs": 99})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text


# ---- gRPC -----------------------------------------------------------------------------------------------------
def test_grpc_constrained_and_free_streams_mixed(client):
    """32 streams at once, half constrained: constrained ones match; free greedy ones equal their solo run."""
    prompts = [f"story {i}" for i in range(16)]
    solo = {p: collect(client.generate("l3", p, max_tokens=12, temperature=0, timeout=300))[0] for p in prompts[:4]}

    def run(i: int):
        if i % 2:
            return "choice", collect(client.generate("l3", prompts[i // 2], max_tokens=20, temperature=1.0, seed=i,
                                                     structured={"choice": ["alpha", "beta", "gamma"]},
                                                     timeout=300))
        return "free", (prompts[i // 2], collect(client.generate("l3", prompts[i // 2], max_tokens=12,
                                                                 temperature=0, timeout=300)))

    for kind, out in in_parallel(run, range(32)):
        if kind == "choice":
            _, text, last = out
            assert text in {"alpha", "beta", "gamma"} and last.finish_reason == "stop"
        else:
            p, (ids, _, _) = out
            if p in solo:
                assert ids == solo[p]


def test_grpc_chat_tools_n_and_prompt_logprobs(client):
    responses = list(client.chat("l3", [{"role": "user", "content": "Weather in Rome?"}], tools=WEATHER_TOOLS,
                                 tool_choice="required", temperature=1.0, seed=4, max_tokens=100, n=2,
                                 prompt_logprobs=1, timeout=300))
    last = {r.index: r for r in responses if r.finish_reason}
    assert set(last) == {0, 1}
    for r in last.values():
        assert r.finish_reason == "tool_calls"
        [call] = r.tool_calls
        assert call.id.startswith("call_") and json.loads(call.arguments)["city"] in {"Paris", "Rome", "Oslo"}
    firsts = [r for r in responses if r.prompt_logprobs]
    assert len(firsts) == 1 and all(p.logprob <= 0 for p in firsts[0].prompt_logprobs)


def test_grpc_bad_constraints_are_invalid_argument(client):
    for structured, words in [({"regex": "(oops"}, "regex"), ({"json_schema": "{not json"}, "json_schema")]:
        with pytest.raises(grpc.RpcError) as e:
            collect(client.generate("l3", "x", structured=structured, timeout=60))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        collect(client.chat("l3", [{"role": "user", "content": "x"}], tool_choice="required", timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool_choice" in e.value.details()


def test_large_constraints_and_tools_beside_free_streams(cluster, client):
    """24 requests at once: free gRPC streams, chats constrained by a 2,000-property schema (66 KB: checked in
    a thread of the ingress, compiled on the engine's grammar thread), and a schema and tools over
    limits.max_structured_chars / max_tools_chars (262,144 characters), refused naming the key."""
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)},
           "required": [f"p{i}" for i in range(2000)]}
    over = {"enum": [f"value-{i:06d}" for i in range(20000)]}
    many_tools = [{"type": "function", "function": {"name": f"t{i}", "description": "d" * 2100,
                                                    "parameters": {"type": "object", "properties": {}}}}
                  for i in range(128)]
    assert len(json.dumps(big)) < 262_144 < min(len(json.dumps(over)), len(json.dumps(many_tools)))
    headers = {"authorization": f"Bearer {API_KEY}"}
    msgs = [{"role": "user", "content": "Describe it"}]

    def chat_with(schema: dict) -> httpx.Response:
        with httpx.Client(base_url=cluster.http_url, headers=headers, timeout=300) as http:
            return http.post("/v1/chat/completions", json={
                "model": "l3", "messages": msgs, "max_tokens": 12, "temperature": 1.0,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})

    def run(i: int):
        kind = ("free", "free", "big", "over", "tools", "free")[i % 6]
        if kind == "free":
            return kind, collect(client.generate("l3", f"story {i}", max_tokens=16, temperature=0, timeout=300))
        if kind == "tools":
            with pytest.raises(grpc.RpcError) as e:
                collect(client.chat("l3", msgs, tools=many_tools, tool_choice="required", timeout=300))
            return kind, e.value
        return kind, chat_with(big if kind == "big" else over)

    outcomes = in_parallel(run, range(24), workers=24)
    for kind, out in outcomes:
        if kind == "free":
            ids, _, last = out
            assert len(ids) == 16 and last.finish_reason == "length"
        elif kind == "big":
            assert out.status_code == 200, out.text
            assert out.json()["choices"][0]["message"]["content"].startswith('{"p0": '), out.text
        elif kind == "over":
            error = out.json()["error"]
            assert out.status_code == 400 and error["param"] == "response_format.json_schema.schema", out.text
            assert "limits.max_structured_chars" in error["message"]
        else:
            assert out.code() == grpc.StatusCode.INVALID_ARGUMENT and "limits.max_tools_chars" in out.details()
    assert sorted({kind for kind, _ in outcomes}) == ["big", "free", "over", "tools"]


def test_the_checkpoints_jinja_template_renders_tools(client):
    """Tokenize with tools renders through the checkpoint's Llama 3.1 template (its system header and tool
    instructions), not the built-in format."""
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    with_tools = client.tokenize("l3", messages=msgs, tools=WEATHER_TOOLS)
    plain = client.tokenize("l3", messages=msgs)
    text = "".join(with_tools.tokens)
    assert "Cutting Knowledge Date" in text and "get_weather" in text and "get_weather" not in "".join(plain.tokens)
