"""The soak's feature mix (benchmarks/soak_features.py): what it asks for, and that its output check catches
each way an output can break a feature's contract (the soak end to end is in test_load_bench)."""
import json
import random

import pytest

from benchmarks.bench_common import CompletionOutput
from benchmarks.soak_features import CHOICES, FEATURES, FeatureRequest, draw_feature, violation
from cluster.pb import inference_pb2 as pb


def _feature(name: str, n: int = 1) -> FeatureRequest:
    return FeatureRequest(name, {}, expect={"n": n})


def _out(text: str = "", finish: str = "stop", tokens: int = 3, logprobs: int = 0, calls=()) -> CompletionOutput:
    return CompletionOutput(text=text, tokens=tokens, logprobs=logprobs, finish_reason=finish, tool_calls=list(calls))


def test_every_feature_is_drawn_with_fields_the_server_takes():
    rng = random.Random(0)
    drawn = {}
    for _ in range(400):
        f = draw_feature(rng, pb)
        drawn[f.name] = f
        pb.SamplingParams(max_tokens=8, **f.sampling)   # every field is a real SamplingParams field
        if f.chat is not None:
            pb.ChatRequest(model="m", **f.chat)
    assert sorted(drawn) == sorted(FEATURES)
    assert drawn["json_schema"].whole_budget and drawn["tools"].whole_budget and not drawn["n"].whole_budget
    assert 2 <= drawn["n"].expect["n"] <= 4 and drawn["n"].sampling["n"] == drawn["n"].expect["n"]
    assert drawn["tools"].chat["tool_choice"].mode == "required"


@pytest.mark.parametrize("feature, outputs", [
    ("json_schema", {0: _out('{"name": "ab", "age": 3}')}),
    ("json_schema", {0: _out('{"name": "ab", "ag', finish="length")}),       # cut by max_tokens: not checked
    ("regex", {0: _out("abc-123")}),
    ("choice", {0: _out(CHOICES[2])}),
    ("choice", {0: _out("gamma d", finish="length")}),
    ("n", {0: _out("x", finish="length"), 1: _out("y"), 2: _out("", finish="length")}),
    ("logprobs", {0: _out("abc", tokens=3, logprobs=3)}),
    ("stop", {0: _out("xyz", finish="length")}),
    ("tools", {0: _out("", finish="tool_calls", calls=[("get_weather", '{"city": "Paris"}')])}),
    ("tools", {0: _out('[{"name": "get_wea', finish="length")}),
])
def test_outputs_that_keep_the_contract_pass(feature, outputs):
    n = len(outputs) if feature == "n" else 1
    assert violation(_feature(feature, n), outputs) is None


@pytest.mark.parametrize("feature, outputs, expected", [
    ("json_schema", {0: _out('{"name": "ab"}')}, "not a document of the schema"),          # "age" required
    ("json_schema", {0: _out('{"name": "ab", "age": 3')}, "not a document of the schema"),  # not JSON
    ("regex", {0: _out("abc-1")}, "does not match"),
    ("choice", {0: _out("\ufffdalpha")}, "not one of the choices"),    # what the soak found (tokenizer fix)
    ("choice", {0: _out("delta", finish="length")}, "not one of the choices"),
    ("n", {0: _out("x"), 2: _out("y")}, "completions [0, 2] for n=3"),
    ("logprobs", {0: _out("abc", tokens=3, logprobs=2)}, "2 logprobs for 3 tokens"),
    ("stop", {0: _out("the end", finish="length")}, "stop string 'e'"),
    ("tools", {0: _out("it is sunny")}, "finish_reason 'stop' with 0 tool call(s)"),
    ("tools", {0: _out("", finish="tool_calls", calls=[("get_weather", '{"town": "x"}')])}, "ValidationError"),
    ("tools", {0: _out("", finish="tool_calls", calls=[("rm_rf", "{}")])}, "ValueError"),
    ("tools", {0: _out("", finish="tool_calls")}, "with 0 tool call(s)"),
    ("regex", {0: _out("abc-12", finish="")}, "finish_reason ''"),
])
def test_each_broken_contract_is_named(feature, outputs, expected):
    n = 3 if feature == "n" else 1
    problem = violation(_feature(feature, n), outputs)
    assert problem is not None and expected in problem, problem


def test_the_schema_is_valid_json_schema():
    import jsonschema

    from benchmarks.soak_features import PERSON_SCHEMA, WEATHER_TOOL
    for schema in (PERSON_SCHEMA, WEATHER_TOOL["parameters"]):
        jsonschema.Draft202012Validator.check_schema(schema)
        json.dumps(schema)
