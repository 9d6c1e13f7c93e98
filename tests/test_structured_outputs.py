"""Structured outputs on random-weight checkpoints of both tokenizer families: a grammar must force a valid
output from a model that knows nothing. JSON schemas validated with `jsonschema`, regexes, choices, GBNF and
Lark grammars, a constrained batch mixed with unconstrained requests, dozens of concurrent requests through
AsyncEngine, preemption by recompute, and the errors of bad specs."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from tests.checkpoints import LLAMA3_GQA_TIED, make_text_checkpoint
from workers import AsyncEngine, Engine, InvalidRequestError, SamplingParams
from workers.demo import LLAMA3_VOCAB, hf_config, write_checkpoint
from workers.structured_output import GrammarCompiler, StructuredOutputs, validate_structured

KV = 64 << 20  # bytes of KV cache: plenty for these tiny models


@pytest.fixture(scope="module", params=["llama2-sentencepiece", "llama3-tiktoken"])
def checkpoint(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    if request.param == "llama2-sentencepiece":
        return make_text_checkpoint(root, "llama2")
    # Meta's Llama 3 tokenizer (128,256 tokens) on a tiny GQA model: the real vocabulary the masks cover.
    spec = dict(LLAMA3_GQA_TIED, vocab_size=LLAMA3_VOCAB, bos_token_id=128000, eos_token_id=[128001, 128009],
                max_position_embeddings=4096, rope_scaling=None)
    return write_checkpoint(root / "llama3", hf_config(**spec), tokenizer="llama3")


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = Engine.from_pretrained(checkpoint, dtype="float32", show_progress=False, kv_cache_memory=KV)
    yield eng
    eng.shutdown()


def obj(properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": properties, "required": required or list(properties),
            "additionalProperties": False}


# Bounded, as OpenAI's strict schemas usually are: a random model never chooses to end an unbounded string or
# number (that case is test_max_tokens_cuts_a_constrained_request_with_length).
SCHEMAS = [
    obj({"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"color": {"enum": ["red", "green", "blue"]}, "score": {"type": "number", "minimum": 0, "maximum": 10,
                                                            "multipleOf": 0.25}}),
    obj({"tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "minItems": 1,
                  "maxItems": 3}}),
    obj({"point": obj({"x": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}}),
         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    obj({"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}, "kind": {"const": "user"},
         "note": {"type": ["string", "null"], "maxLength": 5}}),
    obj({"items": {"type": "array", "maxItems": 2,
                   "items": obj({"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
                                 "qty": {"type": "integer", "minimum": 1, "maximum": 9}})}}),
    obj({"status": {"enum": ["ok", "error", 404, None]}, "retry": {"type": "boolean"}}),
    obj({"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "string", "maxLength": 4}},
        required=["a"]),
    obj({"answer": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99},
                              {"type": "string", "enum": ["unknown"]}]}}),
    obj({"matrix": {"type": "array", "minItems": 1, "maxItems": 2,
                    "items": {"type": "array", "minItems": 1, "maxItems": 2,
                              "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
]
PROMPTS = ["Reply in JSON:", "Hello there", "The answer is", "x", "Data follows"]


def _params(i: int, **kw) -> SamplingParams:
    # Greedy for some, seeded temperature > 0 for others, so the mask matters for the drawn tokens too.
    temp = [0.0, 0.7, 1.0, 1.3, 0.0][i % 5]
    return SamplingParams(temperature=temp, seed=1000 + i, **kw)


def test_fifty_json_schema_requests_all_parse_and_validate(engine):
    reqs = [(PROMPTS[j], schema) for schema in SCHEMAS for j in range(5)]
    assert len(reqs) == 50
    outs = engine.generate([p for p, _ in reqs], [_params(i, max_tokens=200, structured={"json_schema": s})
                                                   for i, (_, s) in enumerate(reqs)])
    for (_, schema), out in zip(reqs, outs):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    # The schema accepted as its JSON text too (the form a gRPC string field carries), with the same result.
    again = engine.generate([reqs[7][0]], _params(7, max_tokens=200, structured={"json_schema": json.dumps(reqs[7][1])}))
    assert again[0].token_ids == outs[7].token_ids


REGEXES = [r"[a-z]{2,6}@example\.(com|org)", r"\d{4}-\d{2}-\d{2}", r"(yes|no|maybe)!", r"[A-Z][a-z]{1,5} [0-9]{1,3}"]


def test_regex_outputs_match(engine):
    reqs = [(r, i) for r in REGEXES for i in range(3)]
    outs = engine.generate(["Answer:"] * len(reqs), [_params(i, max_tokens=40, structured={"regex": r})
                                                      for r, i in reqs])
    for (regex, _), out in zip(reqs, outs):
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), (regex, out.text)


def test_choice_outputs_are_one_of_the_choices(engine):
    choices = ["positive", "negative", "neutral", "it's complicated"]
    outs = engine.generate(["Sentiment:"] * 8, [_params(i, max_tokens=20, structured={"choice": choices})
                                                for i in range(8)])
    assert all(o.finish_reason == "stop" and o.text in choices for o in outs), [o.text for o in outs]


GBNF = r'''
root   ::= "(" item ("," item){0,3} ")"
item   ::= [a-c] digit?
digit  ::= [0-9]
'''
LARK = r'''
start: "SELECT " col (", " col)~0..2 " FROM " TABLE
col: "id" | "name" | "age"
TABLE: /[a-z]{1,8}/
'''


def test_gbnf_and_lark_grammars(engine):
    outs = engine.generate(["Q:"] * 6, [_params(i, max_tokens=60, structured={"grammar": g})
                                        for i, g in enumerate([GBNF, LARK] * 3)])
    for i, out in enumerate(outs):
        pattern = r"\([a-c][0-9]?(,[a-c][0-9]?){0,3}\)" if i % 2 == 0 else \
            r"SELECT (id|name|age)(, (id|name|age)){0,2} FROM [a-z]{1,8}"
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text), out.text


def test_json_object_gives_a_json_object(engine):
    # Any object: the model chooses its size and a random one never closes a string, so push quotes and the
    # closing brace (a bias is only a preference: the grammar still decides what is allowed where).
    tok = engine.tokenizer
    bias = {i: {b'"': 20.0, b"}": 15.0}[tok.token_bytes(i)] for i in range(tok.vocab_size)
            if tok.token_bytes(i) in (b'"', b"}")}
    outs = engine.generate(["JSON:"] * 4, [_params(i, max_tokens=100, structured={"json_object": True},
                                                   logit_bias=bias) for i in range(4)])
    for out in outs:
        assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict), out.text
    assert any(json.loads(o.text) for o in outs)  # not only empty objects


def test_max_tokens_cuts_a_constrained_request_with_length(engine):
    # An unbounded number: the grammar is never complete within 6 tokens, so the client must see "length"
    # (and a text that is not yet valid JSON), not "stop".
    schema = obj({"v": {"type": "number"}, "w": {"type": "number"}})
    out = engine.generate(["x"], SamplingParams(max_tokens=6, temperature=0.0, structured={"json_schema": schema}))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    with pytest.raises(ValueError):
        json.loads(out.text)


def test_unconstrained_rows_equal_the_same_requests_run_alone(engine):
    plain = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=0.9, seed=7, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=8, ignore_eos=True)]
    alone = [engine.generate(["A plain request"], p)[0].token_ids for p in plain]
    constrained = [_params(i, max_tokens=100, structured={"json_schema": SCHEMAS[i]}) for i in range(4)]
    mixed = [constrained[0], plain[0], constrained[1], plain[1], constrained[2], plain[2], constrained[3]]
    prompts = ["Reply:" if p.structured else "A plain request" for p in mixed]
    outs = engine.generate(prompts, mixed)
    assert [outs[1].token_ids, outs[3].token_ids, outs[5].token_ids] == alone
    for i, j in enumerate([0, 2, 4, 6]):
        assert outs[j].finish_reason == "stop"
        jsonschema.validate(json.loads(outs[j].text), SCHEMAS[i])


def test_preemption_by_recompute_keeps_the_grammar_in_step(checkpoint):
    """A pool of a few blocks forces preemption; a preempted sequence keeps its output and its matcher (only its
    KV is recomputed), so its tokens equal those of a run with room for everyone."""
    params = [_params(i, max_tokens=120, structured={"json_schema": SCHEMAS[i % len(SCHEMAS)]}) for i in range(8)]
    prompts = [f"Hi {i}" for i in range(8)]
    # Short prompts all fit the 12 blocks of 4 tokens at first; as the outputs grow, sequences must give way.
    roomy = Engine.from_pretrained(checkpoint, dtype="float32", show_progress=False, kv_cache_memory=KV)
    tight = Engine.from_pretrained(checkpoint, dtype="float32", show_progress=False, num_gpu_blocks_override=12,
                                   block_size=4, max_model_len=48, enable_prefix_caching=False)
    try:
        expected = roomy.generate(prompts, params)
        got = tight.generate(prompts, params)
        assert tight.stats().num_preemptions > 0
    finally:
        roomy.shutdown()
        tight.shutdown()
    for e, g, p in zip(expected, got, params):
        # A sequence that reached max_model_len (48 here) stops early, with "length"; the rest are identical.
        if g.finish_reason == "length":
            assert g.token_ids == e.token_ids[:len(g.token_ids)]
        else:
            assert (g.token_ids, g.finish_reason) == (e.token_ids, "stop")
            jsonschema.validate(json.loads(g.text), p.structured.json_schema)
    assert sum(g.finish_reason == "stop" for g in got) >= 4


def test_dozens_of_concurrent_constrained_streams(checkpoint):
    kinds = [{"json_schema": s} for s in SCHEMAS] + [{"regex": r} for r in REGEXES] + \
            [{"choice": ["alpha", "beta", "gamma"]}, {"grammar": GBNF}]

    async def one(engine: AsyncEngine, i: int):
        spec = kinds[i % len(kinds)]
        text, finish, indices = "", None, set()
        async for d in engine.generate(f"Request {i}:", _params(i, max_tokens=200, structured=spec)):
            text += d.text
            finish = d.finish_reason
            indices.add(d.index)
        return spec, text, finish, indices

    async def bad(engine: AsyncEngine):
        with pytest.raises(InvalidRequestError, match="strin"):
            async for _ in engine.generate("x", SamplingParams(structured={"json_schema": {"type": "strin"}})):
                pass

    async def main():
        engine = AsyncEngine.from_pretrained(checkpoint, dtype="float32", show_progress=False, kv_cache_memory=KV)
        try:
            results = await asyncio.wait_for(asyncio.gather(*(one(engine, i) for i in range(40)), bad(engine)), 300)
            for _ in range(500):  # stats are the engine thread's snapshot after its latest step
                s = engine.stats()
                if s.num_running == 0 and s.kv_blocks_free == s.kv_blocks_total:
                    break
                await asyncio.sleep(0.01)
            assert s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total
            return results[:-1]
        finally:
            engine.shutdown()

    for spec, text, finish, indices in asyncio.run(main()):
        assert finish == "stop" and indices == {0}, (spec, text)
        kind, value = next(iter(spec.items()))
        if kind == "json_schema":
            jsonschema.validate(json.loads(text), value)
        elif kind == "regex":
            assert re.fullmatch(value, text)
        elif kind == "choice":
            assert text in value
        else:
            assert re.fullmatch(r"\([a-c][0-9]?(,[a-c][0-9]?){0,3}\)", text)


# ---- errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, param, words", [
    ({"json_schema": {"type": "strin"}}, "structured.json_schema", "strin"),
    ({"json_schema": {"type": "string", "format": "weird"}}, "structured.json_schema", "weird"),
    ({"json_schema": {"type": "object", "not": {"type": "string"}}}, "structured.json_schema", "not"),
    ({"json_schema": "{not json"}, "structured.json_schema", "JSON"),
    ({"json_schema": [1, 2]}, "structured.json_schema", "object"),
    ({"regex": "[a-z"}, "structured.regex", "unclosed"),
    ({"grammar": 'root ::= "a" undefined_rule'}, "structured.grammar", "undefined_rule"),
    ({"grammar": "start: foo\n"}, "structured.grammar", "foo"),
    ({"choice": []}, "structured.choice", "non-empty"),
    ({"choice": ["a", 3]}, "structured.choice", "3"),
    ({"regex": "a", "choice": ["a"]}, "structured", "exactly one"),
    ({}, "structured", "exactly one"),
    ({"yaml": "x"}, "structured.yaml", "unknown"),
])
def test_bad_specs_are_named_at_the_edge(spec, param, words):
    with pytest.raises(InvalidRequestError) as err:
        validate_structured(spec)
    assert err.value.field == param and words.lower() in err.value.message.lower(), err.value.message


def test_a_bad_grammar_fails_only_its_request(engine):
    bad = SamplingParams(max_tokens=5, structured={"json_schema": {"type": "object", "not": {}}})
    good = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    outs = engine.generate(["a", "b"], [bad, good])
    assert outs[0].finish_reason == "error" and isinstance(outs[0].error, InvalidRequestError)
    assert outs[0].error.field == "structured.json_schema" and "not" in outs[0].error.message
    assert outs[1].finish_reason == "length" and len(outs[1].token_ids) == 5
    s = engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total and not engine.has_unfinished()


def test_a_model_without_tokenizer_refuses_grammars(tmp_path):
    from tests.checkpoints import LLAMA2_MHA, make_checkpoint
    eng = Engine.from_pretrained(make_checkpoint(tmp_path, "bare", LLAMA2_MHA), dtype="float32",
                                 show_progress=False, kv_cache_memory=KV)
    try:
        with pytest.raises(InvalidRequestError, match="tokenizer") as err:
            eng.add_request([1, 2, 3], SamplingParams(structured={"regex": "a+"}))
        assert err.value.field == "structured"
    finally:
        eng.shutdown()


def test_compiled_grammars_are_cached_per_spec(engine):
    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, [engine.tokenizer.eos_id])
    try:
        a = compiler.compile(StructuredOutputs(json_schema=SCHEMAS[0]))
        b = compiler.compile(StructuredOutputs(json_schema=json.dumps(SCHEMAS[0])))  # same schema, as text
        c = compiler.compile(StructuredOutputs(json_schema=SCHEMAS[1]))
        assert a is b and a is not c
        m1, m2 = compiler.matcher(a.result()), compiler.matcher(a.result())
        tok = engine.tokenizer
        m1.accept(next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"{"))
        assert (m1.num_tokens, m2.num_tokens) == (1, 0)  # each sequence has its own state
    finally:
        compiler.shutdown()


def test_a_large_schema_compiling_does_not_hold_up_a_small_one(engine):
    """Two compile threads at least: a regex asked for while a ~400 KB schema compiles (~0.5-1 s) is ready
    first, and the tokenizer both need is built once."""
    from workers import structured_output

    assert structured_output.compile_threads(2) == 2 and structured_output.compile_threads(64) == 4
    built = []
    real = structured_output.ll_tokenizer

    def counting(*args):
        built.append(1)
        return real(*args)

    compiler = GrammarCompiler(engine.tokenizer, engine.vocab_size, [engine.tokenizer.eos_id])
    big = {"type": "object", "properties": {
        f"p{i}": {"type": "object", "properties": {f"q{j}": {"type": "string", "pattern": "[a-z]{2,8}"}
                                                   for j in range(6)}} for i in range(1200)}}
    try:
        structured_output.ll_tokenizer = counting
        large = compiler.compile(StructuredOutputs(json_schema=big))
        small = compiler.compile(StructuredOutputs(regex="[0-9]{4}"))
        small.result(timeout=60)
        assert not large.done()        # fails with one thread: the regex waits for the schema
        large.result(timeout=60)
    finally:
        structured_output.ll_tokenizer = real
        compiler.shutdown()
    assert len(built) == 1


def test_structured_crosses_hops_as_a_dict():
    p = SamplingParams(max_tokens=None, structured={"json_schema": SCHEMAS[0]}, logit_bias={"5": -100, 7: 2.5}, n=3,
                       prompt_logprobs=2)
    d = p.to_dict()
    assert d["structured"] == {"json_schema": SCHEMAS[0]} and d["logit_bias"] == {5: -100.0, 7: 2.5}
    again = SamplingParams.from_dict(json.loads(json.dumps(d)))  # JSON turns the bias keys into strings
    assert again == p and isinstance(again.structured, StructuredOutputs)


def test_n_completions_each_follow_the_grammar(engine):
    schema = SCHEMAS[3]
    out = engine.generate(["Give three:"], SamplingParams(n=3, temperature=1.0, seed=21, max_tokens=200,
                                                          structured={"json_schema": schema}))[0]
    assert [c.index for c in out.completions] == [0, 1, 2]
    for c in out.completions:  # each completion has its own matcher, from the same compiled grammar
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    assert len({c.text for c in out.completions}) > 1
