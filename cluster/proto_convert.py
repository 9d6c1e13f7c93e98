"""herd.v1 protobuf messages <-> the plain dicts the Frontend works with (cluster.ingress).

Sampling fields are read from the message's descriptor, not from a list of names: a field added to
`SamplingParams` in the .proto (and to workers.SamplingParams, which tests/test_proto.py holds equal) passes
through without an edit here. An unset optional scalar is left out, so workers.SamplingParams' default
applies, never proto's zero.
"""
from __future__ import annotations

import json
from typing import Any, Iterator

from cluster.errors import ApiError
from cluster.pb import inference_pb2 as pb

# Prompt positions whose logprobs one GenerateResponse carries at most (see responses_from_chunk): with the
# top 20 and long token texts, ~1 MiB.
PROMPT_LOGPROBS_PER_MESSAGE = 512


def _is_map(f) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _is_repeated(f) -> bool:
    return f.is_repeated


def sampling_from_proto(msg: pb.SamplingParams) -> dict[str, Any]:
    """Set fields only: an unset optional keeps workers.SamplingParams' default (never proto's zero)."""
    d: dict[str, Any] = {}
    for f in msg.DESCRIPTOR.fields:
        value = getattr(msg, f.name)
        if _is_map(f):
            if value:
                d[f.name] = dict(value)
        elif _is_repeated(f):
            if value:
                d[f.name] = list(value)
        elif f.message_type is not None:
            if msg.HasField(f.name):
                d[f.name] = _CONVERT_MESSAGE[f.name](value)
        elif msg.HasField(f.name):
            d[f.name] = value
    return d


def structured_from_proto(msg: pb.StructuredOutput) -> dict[str, Any]:
    """workers.StructuredOutputs' dict form; the JSON schema stays text (the engine parses it, once per schema)."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ApiError.invalid("sampling.structured", "set one of json_schema, json_object, regex, choice, grammar")
    if kind == "choice":
        return {"choice": list(msg.choice.choices)}
    return {kind: getattr(msg, kind)}


_CONVERT_MESSAGE = {"structured": structured_from_proto}


def messages_from_proto(messages) -> list[dict[str, Any]]:
    """Chat messages in OpenAI's shape (what workers' chat templates take): only the fields a message sets."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def tools_from_proto(tools) -> list[dict[str, Any]]:
    """OpenAI tool definitions; `parameters` arrives as JSON text."""
    out = []
    for i, t in enumerate(tools):
        fn: dict[str, Any] = {"name": t.name}
        if t.description:
            fn["description"] = t.description
        if t.parameters:
            try:
                fn["parameters"] = json.loads(t.parameters)
            except ValueError as e:
                raise ApiError.invalid(f"tools[{i}].parameters", f"is not valid JSON: {e}") from None
        out.append({"type": "function", "function": fn})
    return out


def tool_choice_from_proto(request: pb.ChatRequest) -> str | dict | None:
    if not request.HasField("tool_choice"):
        return None
    which = request.tool_choice.WhichOneof("choice")
    if which == "function":
        return {"type": "function", "function": {"name": request.tool_choice.function}}
    return request.tool_choice.mode if which == "mode" else None


def _token_logprob(token_id: int, entry: dict, token_text) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=token_id, logprob=entry["logprob"],
                           top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp, token=token_text(t))
                                         for t, lp in entry["top"]])


def response_from_chunk(chunk: dict, request_id: str, token_text, prompt_ids: list[int]) -> pb.GenerateResponse:
    """One stream chunk of the model deployment (cluster.deployment's contract, plus "tool_calls" from
    cluster.chat_tools) as one GenerateResponse. `token_text(id)` gives a token's text."""
    resp = pb.GenerateResponse(token_ids=chunk["token_ids"], text=chunk["text"],
                               finish_reason=chunk["finish_reason"] or "", request_id=request_id,
                               index=chunk.get("index", 0))
    if chunk["finish_reason"] is not None:
        resp.usage.CopyFrom(pb.Usage(prompt_tokens=chunk["prompt_tokens"],
                                     completion_tokens=chunk["completion_tokens"],
                                     cached_tokens=chunk["cached_tokens"]))
    if chunk["logprobs"] is not None:
        resp.logprobs.extend(_token_logprob(tok, entry, token_text)
                             for tok, entry in zip(chunk["token_ids"], chunk["logprobs"]))
    for call in chunk.get("tool_calls") or ():
        resp.tool_calls.append(pb.ToolCall(id=call["id"], name=call["function"]["name"],
                                           arguments=call["function"]["arguments"]))
    resp.prompt_logprobs.extend(_token_logprob(tok, entry, token_text)
                                for tok, entry in _prompt_entries(chunk, prompt_ids))
    return resp


def responses_from_chunk(chunk: dict, request_id: str, token_text, prompt_ids: list[int],
                         per_message: int = PROMPT_LOGPROBS_PER_MESSAGE) -> Iterator[pb.GenerateResponse]:
    """`response_from_chunk`, with a long prompt's logprobs spread over several responses: the leading ones
    carry `per_message` positions each and nothing else (request_id and index set), the last one the rest
    with the chunk's tokens. In one response, a 16k-token prompt's logprobs with their top 20 came to 7 MiB
    (a gRPC client's default limit is 4 MiB, the proxy's limits.max_grpc_message_bytes 8 MiB) and took the
    ingress's event loop for the whole conversion; between these responses it serves other streams."""
    entries = _prompt_entries(chunk, prompt_ids)
    index = chunk.get("index", 0)
    while len(entries) > per_message:
        head, entries = entries[:per_message], entries[per_message:]
        yield pb.GenerateResponse(request_id=request_id, index=index,
                                  prompt_logprobs=[_token_logprob(tok, entry, token_text) for tok, entry in head])
    rest = {**chunk, "prompt_logprobs": None}
    resp = response_from_chunk(rest, request_id, token_text, prompt_ids)
    resp.prompt_logprobs.extend(_token_logprob(tok, entry, token_text) for tok, entry in entries)
    yield resp


def _prompt_entries(chunk: dict, prompt_ids: list[int]) -> list[tuple[int, dict]]:
    """(token, logprob entry) of each prompt position that has one: the first prompt token has none (nothing
    precedes it), so positions from the second on."""
    prompt_logprobs = chunk.get("prompt_logprobs")
    if not prompt_logprobs:
        return []
    return [(tok, entry) for tok, entry in zip(prompt_ids[1:], prompt_logprobs[1:]) if entry]
