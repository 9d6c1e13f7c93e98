"""Tool calling: validating OpenAI tools / tool_choice, the schema a grammar enforces, and parsing Llama 3.1 JSON
tool calls out of whole and streamed answers."""
from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from workers.errors import InvalidRequestError
from workers.tool_calls import (PYTHON_TAG, ParsedToolCalls, ToolCallStreamParser, parse_tool_calls,
                                tool_call_json_schema, validate_tool_choice, validate_tools)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                                  "required": ["a", "b"]}}}
NO_ARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, ADD, NO_ARGS]


# ---- validate_tools ----------------------------------------------------------------------------------------------

def test_a_tool_schema_is_checked_against_the_meta_schema_once(monkeypatch):
    """jsonschema's meta-schema check (~3 ms a tool) runs once per distinct parameters schema; an invalid one is
    refused every time; the cache keeps at most CHECKED_SCHEMAS_CACHE_SIZE digests."""
    import uuid

    from jsonschema import Draft202012Validator

    import workers.tool_calls as tool_calls

    checks = []
    real = Draft202012Validator.check_schema

    def counting(schema, *args, **kwargs):
        checks.append(json.dumps(schema, sort_keys=True))
        return real(schema, *args, **kwargs)

    monkeypatch.setattr(Draft202012Validator, "check_schema", counting)
    monkeypatch.setattr(tool_calls, "CHECKED_SCHEMAS_CACHE_SIZE", 3)
    fresh = uuid.uuid4().hex      # a schema no other test has checked
    params = {"type": "object", "properties": {fresh: {"type": "string"}}, "required": [fresh]}
    same_reordered = {"required": [fresh], "properties": {fresh: {"type": "string"}}, "type": "object"}
    tool = lambda p: {"type": "function", "function": {"name": "f", "parameters": p}}  # noqa: E731
    assert validate_tools([tool(params)]) == validate_tools([tool(same_reordered)])
    assert len(checks) == 1
    bad = {"type": "object", "properties": {fresh: {"type": 5}}}
    for _ in range(2):
        with pytest.raises(InvalidRequestError):
            validate_tools([tool(bad)])
    assert len(checks) == 3
    for i in range(4):
        validate_tools([tool({"type": "object", "properties": {f"{fresh}{i}": {"type": "integer"}}})])
    assert len(tool_calls._checked_schemas) == 3
    validate_tools([tool(params)])   # pushed out by the four after it: checked again
    assert len(checks) == 8


def test_valid_tools_are_normalised():
    tools = validate_tools([dict(WEATHER, extra="dropped"), ADD, NO_ARGS,
                            {"type": "function", "function": {"name": "x-1", "strict": True, "description": None}}])
    assert tools[0] == WEATHER and tools[1] == ADD and tools[2] == NO_ARGS
    assert tools[3] == {"type": "function", "function": {"name": "x-1", "strict": True}}
    assert validate_tools([]) == []


@pytest.mark.parametrize("tools, param, message", [
    ({"type": "function"}, "tools", "must be a list"),
    (["get_weather"], "tools[0]", "must be an object"),
    ([WEATHER, {"type": "code_interpreter"}], "tools[1].type", "must be 'function', got 'code_interpreter'"),
    ([{"type": "function"}], "tools[0].function", "must be an object"),
    ([WEATHER, {"type": "function", "function": {"description": "x"}}], "tools[1].function.name", "got None"),
    ([{"type": "function", "function": {"name": "get weather"}}], "tools[0].function.name", "letters, digits"),
    ([{"type": "function", "function": {"name": "f" * 65}}], "tools[0].function.name", "1 to 64"),
    ([ADD, ADD], "tools[1].function.name", "'add' is already the name of tools[0]"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "tools[0].function.description",
     "must be a string, got int"),
    ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0].function.parameters",
     "must be a JSON schema object, got str"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
     "tools[0].function.parameters.type", "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "minLength": -1}}}}}],
     "tools[0].function.parameters.properties.a.minLength", "not a valid JSON schema"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
     "tools[0].function.parameters.type", "must be 'object', got 'array'"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], "tools[0].function.strict",
     "must be a boolean"),
    ([NO_ARGS] * 129, "tools", "at most 128 tools"),
])
def test_malformed_tools_name_the_field(tools, param, message):
    with pytest.raises(InvalidRequestError) as e:
        validate_tools(tools)
    assert e.value.field == param
    assert message in e.value.message
    assert not e.value.message.startswith(param)  # the field is not repeated in the message


# ---- validate_tool_choice ----------------------------------------------------------------------------------------

def test_tool_choice_values():
    assert validate_tool_choice(None, TOOLS) == "auto"
    assert validate_tool_choice(None, []) == validate_tool_choice(None, None) == "none"
    for mode in ("auto", "none", "required"):
        assert validate_tool_choice(mode, TOOLS) == mode
    named = {"type": "function", "function": {"name": "add", "extra": 1}}
    assert validate_tool_choice(named, TOOLS) == {"type": "function", "function": {"name": "add"}}


@pytest.mark.parametrize("choice, tools, param, message", [
    ("always", TOOLS, "tool_choice", "got 'always'"),
    ("required", [], "tool_choice", "needs at least one tool"),
    (3, TOOLS, "tool_choice", "got int"),
    ({"type": "tool", "function": {"name": "add"}}, TOOLS, "tool_choice.type", "must be 'function'"),
    ({"type": "function"}, TOOLS, "tool_choice.function.name", "must name the function"),
    ({"type": "function", "function": {"name": "sub"}}, TOOLS, "tool_choice.function.name",
     "'sub' is not one of the tools (tools: 'get_weather', 'add', 'now')"),
    ({"type": "function", "function": {"name": "sub"}}, [], "tool_choice.function.name", "(tools: none)"),
])
def test_bad_tool_choice(choice, tools, param, message):
    with pytest.raises(InvalidRequestError) as e:
        validate_tool_choice(choice, tools)
    assert e.value.field == param and message in e.value.message


# ---- the schema a grammar enforces -------------------------------------------------------------------------------

def test_no_schema_unless_a_call_is_forced():
    assert tool_call_json_schema(TOOLS, "auto") is None
    assert tool_call_json_schema(TOOLS, "none") is None
    assert tool_call_json_schema(TOOLS, None) is None


def test_named_function_schema_accepts_only_its_calls():
    schema = tool_call_json_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}
    jsonschema.validate(ok, schema)
    for bad in [{"name": "add", "parameters": {"a": 1, "b": 2}},
                {"name": "get_weather", "parameters": {"unit": "c"}},           # required city missing
                {"name": "get_weather", "parameters": {"city": "P", "x": 1}},   # the function's own strictness
                {"name": "get_weather"},
                {"name": "get_weather", "parameters": {"city": "P"}, "more": 1}]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # What the schema lets through always parses back into exactly that call.
    parsed = parse_tool_calls(json.dumps(ok), TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", ok["parameters"])]


def test_required_schema_is_any_one_call():
    schema = tool_call_json_schema(TOOLS, "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert len(schema["anyOf"]) == 3
    for call in [{"name": "get_weather", "parameters": {"city": "Oslo"}},
                 {"name": "add", "parameters": {"a": 1, "b": 2.5}},
                 {"name": "now", "parameters": {}}]:
        jsonschema.validate(call, schema)
        assert parse_tool_calls(json.dumps(call), TOOLS).tool_calls[0].name == call["name"]
    for bad in [{"name": "add", "parameters": {"a": "1", "b": 2}}, {"name": "sub", "parameters": {}}, [],
                "get_weather", {"name": "now", "parameters": {"x": 1}}]:  # no parameters: an empty list
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_local_refs_keep_pointing_inside_their_function():
    point = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/properties/tree"}}}}
    tools = validate_tools([
        {"type": "function", "function": {"name": "move", "parameters": {
            "type": "object", "$defs": {"point": point},
            "properties": {"to": {"$ref": "#/$defs/point"}, "default_like": {"const": {"$ref": "#/keep"}}},
            "required": ["to"]}}},
        {"type": "function", "function": {"name": "plant", "parameters": {
            "type": "object", "definitions": {"point": {"type": "string"}},
            "properties": {"at": {"$ref": "#/definitions/point"}, "tree": tree}}}},
    ])
    schema = tool_call_json_schema(tools, "required")
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]) == {"tool0_point", "tool1_point"}  # the same name in two functions stays apart
    jsonschema.validate({"name": "move", "parameters": {"to": {"x": 1}}}, schema)
    jsonschema.validate({"name": "plant", "parameters": {"at": "here", "tree": {"kids": [{"kids": []}]}}}, schema)
    for bad in [{"name": "move", "parameters": {"to": {"y": 1}}}, {"name": "plant", "parameters": {"at": 3}},
                {"name": "plant", "parameters": {"tree": {"kids": [{"kids": 3}]}}}]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # A const's value is data: its "$ref" key is not rewritten.
    assert schema["anyOf"][0]["properties"]["parameters"]["properties"]["default_like"] == {"const": {"$ref": "#/keep"}}
    named = tool_call_json_schema(tools, {"type": "function", "function": {"name": "plant"}})
    jsonschema.validate({"name": "plant", "parameters": {"tree": {"kids": [{"kids": []}]}}}, named)
    # A pointer into the function's own schema now starts where that schema sits.
    assert named["properties"]["parameters"]["properties"]["tree"]["properties"]["kids"]["items"]["$ref"] == \
        "#/properties/parameters/properties/tree"


# ---- parsing whole answers ---------------------------------------------------------------------------------------

def _calls(parsed: ParsedToolCalls) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('  \n{"name": "add", "arguments": {"a": 1, "b": 2}}\n', [("add", {"a": 1, "b": 2})]),
    (PYTHON_TAG + '{"name": "now", "parameters": {}}', [("now", {})]),
    ('{"name": "now"}', [("now", {})]),                                                    # no arguments at all
    ('{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}', [("add", {"a": 1, "b": 2})]),  # stringified
    ('{"type": "function", "name": "now", "parameters": {}}', [("now", {})]),
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": {"city": "a;b"}}',
     [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "a;b"})]),
    ('{"name": "now", "parameters": {}}\n{"name": "add", "parameters": {"a": 0, "b": 0}}',
     [("now", {}), ("add", {"a": 0, "b": 0})]),
    ('[{"name": "now", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "日本"}}]',
     [("now", {}), ("get_weather", {"city": "日本"})]),
])
def test_parses_llama_json_calls(text, expected):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed.content is None
    assert _calls(parsed) == expected
    for call in parsed.tool_calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id)
        assert call.to_openai() == {"id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": call.arguments}}
    assert len({c.id for c in parsed.tool_calls}) == len(parsed.tool_calls)
    # Non-ASCII arguments stay readable in the JSON string, as OpenAI sends them.
    if "日本" in text:
        assert "日本" in parsed.tool_calls[1].arguments


@pytest.mark.parametrize("text", [
    "The weather in Paris is sunny.",
    "",
    "   ",
    '{"name": "sub", "parameters": {}}',                                  # unknown function
    '{"name": "add", "parameters": {"a": 1}',                            # cut off
    'Sure: {"name": "now", "parameters": {}}',                           # text before the call
    '{"name": "now", "parameters": {}} and then some',                   # text after it
    '{"name": "now", "parameters": [1]}',                                # arguments not an object
    '{"name": "now", "parameters": "not json"}',
    '{"name": "now", "parameters": {}, "extra": 1}',
    '{"city": "Paris"}',
    '[]',
    '"now"',
    ';{"name": "now", "parameters": {}}',
    "{not json at all}",
])
def test_anything_else_is_content(text):
    parsed = parse_tool_calls(text, TOOLS)
    assert parsed == ParsedToolCalls(content=text, tool_calls=[])


def test_no_tools_means_no_calls():
    text = '{"name": "now", "parameters": {}}'
    assert parse_tool_calls(text, []).content == text
    assert parse_tool_calls(text, None).tool_calls == []
    assert _calls(parse_tool_calls(text, ["now"])) == [("now", {})]  # plain names are accepted too


# ---- streaming ---------------------------------------------------------------------------------------------------

STREAM_CASES = [
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '\n ' + PYTHON_TAG + '{"name": "add", "parameters": {"a": 1, "b": 2}};{"name": "now", "parameters": {}}',
    '[{"name": "now", "parameters": {}}]',
    "Hello there! It is sunny in Paris. 🌞",
    "  leading spaces then text",
    "<|pyth but not the tag",
    "<",
    '{"name": "sub", "parameters": {}}',
    '[{"name": "now", "parameters": {}}, {"name": "sub"}] then text',
    '[] {"name": "now", "parameters": {}}',
    PYTHON_TAG + "hello",
    '{"looks": "like json"} but is not a call',
    "   ",
    "",
    # brackets, quotes and backslashes inside strings (a piece may end right after a backslash)
    '{"name": "get_weather", "parameters": {"city": "Pa}]\\"ris\\\\"}}',
    '{"looks": "like {json} \\" ]"} then text',
    '[{"name": "now", "parameters": {"s": "\\\\\\\\"}}] [',
    '{"name": "now", "parameters": {]} broken',
    PYTHON_TAG + ' {"name": "now", "parameters": {"x": "}"}}',
]


def _stream(text: str, cuts: list[int]) -> tuple[list[str], ParsedToolCalls]:
    parser = ToolCallStreamParser(TOOLS)
    bounds = [0, *cuts, len(text)]
    deltas = [parser.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])]
    return deltas, parser.finish()


@pytest.mark.parametrize("text", STREAM_CASES)
def test_streaming_split_anywhere_equals_the_whole_text(text):
    whole = parse_tool_calls(text, TOOLS)
    splits = [[i] for i in range(len(text) + 1)]                           # every single boundary
    splits.append(list(range(1, len(text))))                                # one character at a time
    rng = random.Random(len(text))
    splits += [sorted(rng.sample(range(len(text) + 1), min(3, len(text) + 1))) for _ in range(20)]
    for cuts in splits:
        deltas, end = _stream(text, cuts)
        if whole.tool_calls:
            assert "".join(deltas) == "" and end.content is None
            assert _calls(end) == _calls(whole)
        else:
            assert end.tool_calls == []
            assert "".join(deltas) + end.content == text


def test_a_long_streamed_answer_is_decoded_once_not_at_every_bracket(monkeypatch):
    """The held answer is decoded when its first JSON value ends, once: re-decoding it at every closing
    bracket took 2.5 s (107 KB) to 34 s (437 KB) of the ingress's event loop."""
    import workers.tool_calls as tool_calls

    decodes = []

    class Counting(json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            decodes.append(len(s))
            return super().raw_decode(s, idx)

    monkeypatch.setattr(tool_calls, "_decoder", Counting())
    items = [{"k": i, "v": "}]" * 3} for i in range(3000)]
    for text, is_call in ((json.dumps({"name": "add", "parameters": {"a": 1, "b": 2, "items": items}}), True),
                          (json.dumps({"a list": items}) + " and then prose", False)):
        decodes.clear()
        parser = ToolCallStreamParser(TOOLS)
        shown = "".join(parser.feed(text[i:i + 3]) for i in range(0, len(text), 3))
        assert len(decodes) == 1 and decodes[0] >= len(text) - len(" and then prose")
        end = parser.finish()
        if is_call:
            assert shown == "" and [c.name for c in end.tool_calls] == ["add"]
        else:
            assert shown + end.content == text and shown.startswith('{"a list"')


def test_streaming_passes_content_through_as_it_comes():
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("  ") == "" and parser.buffering            # whitespace: a call may still follow
    assert parser.feed("Hi") == "  Hi" and not parser.buffering
    assert parser.feed(" there") == " there"
    assert parser.finish() == ParsedToolCalls(content="", tool_calls=[])

    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("<|py") == "" and parser.buffering           # may be <|python_tag|>
    assert parser.feed("x") == "<|pyx"

    # JSON that is not a call is let go as soon as its first value is complete, not at the end.
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed('{"answer": ') == "" and parser.feed("42") == ""
    assert parser.feed("} and more") == '{"answer": 42} and more' and not parser.buffering
    assert parser.feed(" text") == " text"
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed(PYTHON_TAG) == "" and parser.feed(" print(1)") == PYTHON_TAG + " print(1)"

    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed('{"name": "now", ') == "" and parser.buffering
    assert parser.feed('"parameters": {}}') == ""
    end = parser.finish()
    assert end.content is None and _calls(end) == [("now", {})]


def test_streaming_without_tools_is_plain_content():
    parser = ToolCallStreamParser([])
    assert parser.feed('{"name": "now"}') == '{"name": "now"}'
    assert parser.finish() == ParsedToolCalls(content="", tool_calls=[])


# ---- tools in the built-in Meta formats (checkpoints without a template of their own) ---------------------------

@pytest.fixture(scope="module")
def meta_llama3():
    from workers.demo_tokenizer import llama3_tokenizer_path
    from workers.tokenizer import Tokenizer

    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def meta_llama2(tmp_path_factory):
    from workers.demo_tokenizer import build_llama2_sentencepiece
    from workers.tokenizer import Tokenizer

    return Tokenizer.from_file(build_llama2_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model",
                                                          vocab_size=1000))


CALL_MSG = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
RESULT_MSG = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'}


def test_llama3_builtin_format_renders_tools_like_the_llama31_template(meta_llama3):
    from workers.tool_calls import builtin_tool_instructions

    tok = meta_llama3
    sp = tok.special_tokens

    def turn(role, text):
        return [sp["<|start_header_id|>"]] + tok.encode(role, bos=False) + [sp["<|end_header_id|>"]] + \
            tok.encode("\n\n", bos=False) + tok.encode(text, bos=False) + [sp["<|eot_id|>"]]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                CALL_MSG, RESULT_MSG]
    ids = tok.apply_chat_template(messages, tools=[WEATHER])
    instructions = builtin_tool_instructions(validate_tools([WEATHER]))
    assert instructions.startswith("Given the following functions") and '"name": "get_weather"' in instructions
    expected = [sp["<|begin_of_text|>"]] + turn("system", "Be brief.") + \
        turn("user", instructions + "Weather in Oslo?") + \
        turn("assistant", '{"name": "get_weather", "parameters": {"city": "Oslo"}}') + \
        turn("ipython", '{"temp": -3}')
    generation_prompt = [sp["<|start_header_id|>"]] + tok.encode("assistant", bos=False) + \
        [sp["<|end_header_id|>"]] + tok.encode("\n\n", bos=False)
    assert ids == expected + generation_prompt
    # Without tools (tool_choice "none") the same dialog has no instructions; the call is still replayed.
    plain = tok.apply_chat_template(messages)
    assert "Given the following functions" not in tok.decode(plain) and '"parameters"' in tok.decode(plain)
    # What the model is asked to write is what parse_tool_calls reads.
    answer = tok.decode(turn("assistant", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'))
    assert _calls(parse_tool_calls(answer.split("\n\n", 1)[1], [WEATHER])) == [("get_weather", {"city": "Oslo"})]
    with pytest.raises(InvalidRequestError, match="first user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tools=[WEATHER])


def test_llama2_builtin_format_puts_tools_in_the_system_prompt(meta_llama2):
    from workers.tool_calls import builtin_tool_instructions

    tok = meta_llama2
    system = "<<SYS>>\nBe brief.\n\n" + builtin_tool_instructions(validate_tools([WEATHER])).rstrip() + "\n<</SYS>>\n\n"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                CALL_MSG, RESULT_MSG, {"role": "user", "content": "And tomorrow?"}]
    ids = tok.apply_chat_template(messages, tools=[WEATHER])
    call = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    expected = tok.encode(f"[INST] {system}Weather in Oslo? [/INST] {call} ") + [tok.eos_id] + \
        tok.encode('[INST] Result of get_weather: {"temp": -3}\n\nAnd tomorrow? [/INST]')
    assert ids == expected
    # A tool result may end the dialog: the model answers it.
    ids = tok.apply_chat_template(messages[:4], tools=[WEATHER])
    assert tok.decode(ids).endswith('[INST] Result of get_weather: {"temp": -3} [/INST]')


# ---- forced calls on random weights ------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama2", "llama3"])
def chat_engine(request, tmp_path_factory):
    from tests.checkpoints import make_chat_checkpoint
    from workers import Engine

    path = make_chat_checkpoint(tmp_path_factory.mktemp("tools"), request.param, request.param)
    eng = Engine.from_pretrained(path, dtype="float32", show_progress=False, kv_cache_memory=64 << 20)
    yield eng
    eng.shutdown()


BOUNDED = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_choices_always_parse_even_from_random_weights(chat_engine, choice):
    """The checkpoint's template (the real Llama 2 / 3.1 one) renders the tools; the grammar of
    tool_call_json_schema makes a model that knows nothing answer with a call that parses and fits its schema."""
    from workers import SamplingParams

    tools = validate_tools(BOUNDED)
    prompt = chat_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What's the weather in Paris?"}],
        tools=tools)  # (the real Llama 2 template ignores them; the grammar still forces the call)
    schema = tool_call_json_schema(tools, choice)
    params = [SamplingParams(max_tokens=200, temperature=1.0, seed=seed, structured={"json_schema": schema})
              for seed in range(6)]
    outs = chat_engine.generate([prompt] * len(params), params)
    by_name = {t["function"]["name"]: t["function"].get("parameters") for t in tools}
    for out in outs:
        assert out.finish_reason == "stop", out.text
        parsed = parse_tool_calls(out.text, tools)
        assert parsed.content is None and len(parsed.tool_calls) == 1, out.text
        call = parsed.tool_calls[0]
        if isinstance(choice, dict):
            assert call.name == "get_weather"
        arguments = json.loads(call.arguments)
        jsonschema.validate(arguments, by_name[call.name] or {"type": "object", "maxProperties": 0})
