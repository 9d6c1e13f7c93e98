"""The served features a soak mixes into its load (`herd bench soak --feature-fraction`), and the check of what
each one answered.

A backend does not only stream free text: it parses JSON it asked a schema for, matches a regex, picks one of a
set of choices, reads n completions, logprobs, tool calls. Each of these has its own state in the engine (a
grammar matcher per sequence, sibling sequences sharing a prefill, a tool-call parser at the ingress), so a
soak that only streams plain text would not see one of them leak, or break under concurrency and cancels.

`draw_feature(rng, pb)` picks one feature and the request fields that use it; `violation(feature, completions)`
says how a stream that ended OK broke the feature's contract (None when it kept it). Only what the contract
promises is checked: an output cut by max_tokens ("length") need not be a whole JSON document or regex match,
but a choice cut short must still be the start of one of the choices, logprobs come one per token whatever the
end, no stop string is ever in the text, and a request answered OK has every completion it asked for.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import jsonschema

FEATURES = ("json_schema", "regex", "choice", "n", "logprobs", "stop", "penalties", "tools")

PERSON_SCHEMA = {
    "type": "object",
    # Small enough that a random-weight model, forced through it, ends a document within ~64 tokens.
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2}},
    "required": ["name", "age"], "additionalProperties": False,
}
CODE_REGEX = r"[a-z]{3,8}-[0-9]{2,4}"
CHOICES = ("alpha", "beta", "gamma delta")
STOP_STRINGS = ("e", "the", "ab" * 10)
WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city now.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                               "required": ["city"], "additionalProperties": False}}
# The longest Chat prompt draw_feature makes, in tokens: Llama 3's template with the tool is ~177, plus 30 words.
CHAT_PROMPT_TOKENS = 256
WORDS = ("hello", "world", "weather", "in", "Paris", "please", "tell", "me", "about", "the", "river", "llamas")


@dataclass
class FeatureRequest:
    """One feature's request: SamplingParams fields, and for Chat the messages and tools (herd.v1 messages)."""
    name: str
    sampling: dict[str, Any]
    whole_budget: bool = False                 # asks for --max-tokens: its output needs room to end whole
    chat: Optional[dict[str, Any]] = None      # {"messages": [...], "tools": [...], "tool_choice": ...}
    expect: dict[str, Any] = field(default_factory=dict)   # what the check needs (n, stop strings, ...)


def draw_feature(rng: random.Random, pb: Any) -> FeatureRequest:
    """A feature drawn uniformly from FEATURES, with the fields that use it. `pb`: cluster.pb.inference_pb2."""
    name = rng.choice(FEATURES)
    # ignore_eos off: a finished grammar or tool call ends its completion with EOS ("stop").
    sampling: dict[str, Any] = {"ignore_eos": False}
    if name == "json_schema":
        sampling["structured"] = pb.StructuredOutput(json_schema=json.dumps(PERSON_SCHEMA))
    elif name == "regex":
        sampling["structured"] = pb.StructuredOutput(regex=CODE_REGEX)
    elif name == "choice":
        sampling["structured"] = pb.StructuredOutput(choice=pb.Choices(choices=list(CHOICES)))
    elif name == "n":
        sampling.update(n=rng.randint(2, 4), temperature=1.0, seed=rng.randrange(2**32))
    elif name == "logprobs":
        sampling.update(logprobs=rng.randint(0, 5), prompt_logprobs=rng.randint(0, 3))
    elif name == "stop":
        sampling.update(stop=list(STOP_STRINGS), ignore_eos=True)
    elif name == "penalties":
        sampling.update(temperature=0.8, seed=rng.randrange(2**32), presence_penalty=1.0, frequency_penalty=0.5,
                        repetition_penalty=1.2, logit_bias={5: 3.0, 100: -100.0})
    req = FeatureRequest(name, sampling, whole_budget=name in ("json_schema", "tools"),
                         expect={"n": sampling.get("n", 1)})
    if name == "tools":
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        req.chat = {"messages": [pb.ChatMessage(role="user", content=text)],
                    "tools": [pb.Tool(name=WEATHER_TOOL["name"], description=WEATHER_TOOL["description"],
                                      parameters=json.dumps(WEATHER_TOOL["parameters"]))],
                    "tool_choice": pb.ToolChoice(mode="required")}
    return req


def violation(feature: FeatureRequest, completions: dict[int, Any]) -> Optional[str]:
    """How an OK stream's completions (index -> bench_common.CompletionOutput) broke the feature's contract;
    None when they kept it."""
    if sorted(completions) != list(range(feature.expect["n"])):
        return f"completions {sorted(completions)} for n={feature.expect['n']}"
    for i, out in sorted(completions.items()):
        if out.finish_reason not in ("stop", "length", "tool_calls"):
            return f"completion {i}: finish_reason {out.finish_reason!r}"
        problem = _check_one(feature, out)
        if problem:
            return f"completion {i}: {problem}"
    return None


def _check_one(feature: FeatureRequest, out: Any) -> Optional[str]:
    whole = out.finish_reason == "stop"
    name, text = feature.name, out.text
    if name == "json_schema" and whole:
        try:
            jsonschema.validate(json.loads(text), PERSON_SCHEMA)
        except (ValueError, jsonschema.ValidationError) as e:
            return f"not a document of the schema ({type(e).__name__}): {text[:80]!r}"
    if name == "regex" and whole and not re.fullmatch(CODE_REGEX, text):
        return f"does not match {CODE_REGEX}: {text!r}"
    if name == "choice" and (text not in CHOICES if whole else not any(c.startswith(text) for c in CHOICES)):
        return f"not one of the choices: {text!r}"
    if name == "logprobs" and out.logprobs != out.tokens:
        return f"{out.logprobs} logprobs for {out.tokens} tokens"
    if name == "stop":
        leaked = [s for s in STOP_STRINGS if s in text]
        if leaked:
            return f"stop string {leaked[0]!r} in the output {text[:80]!r}"
    if name == "tools":
        if out.finish_reason == "stop" or (out.finish_reason == "tool_calls") != bool(out.tool_calls):
            return f"finish_reason {out.finish_reason!r} with {len(out.tool_calls)} tool call(s), tool_choice " \
                   f"required (text {text[:60]!r})"
        for called, arguments in out.tool_calls:
            try:
                if called != WEATHER_TOOL["name"]:
                    raise ValueError(f"unknown tool {called!r}")
                jsonschema.validate(json.loads(arguments), WEATHER_TOOL["parameters"])
            except (ValueError, jsonschema.ValidationError) as e:
                return f"tool call {called}({arguments[:60]!r}): {type(e).__name__}"
    return None
