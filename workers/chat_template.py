"""Chat messages, and Meta's built-in Llama chat formats (used when a checkpoint ships no chat template of its own;
jinja_template.py renders the ones that do).

`validate_messages` is the one validator of OpenAI-shaped messages for every format: roles system, user,
assistant, tool (and `ipython`, Llama 3.1's name for it); content a string or text content parts; assistant
`tool_calls`; tool `tool_call_id`. Errors name the message and field ("messages[2].role").

The built-in formats, token-exact with Meta's reference code for plain dialogs:
- Llama 2 (`llama/generation.py` chat_completion): the system prompt is folded into the first user turn
  inside `<<SYS>>` markers; every completed user/assistant pair is its own `bos … eos` segment
  `[INST] user [/INST] answer `; the final user turn is `bos [INST] user [/INST]`.
- Llama 3 (`llama_models` ChatFormat): `<|begin_of_text|>`, then per message
  `<|start_header_id|>role<|end_header_id|>` + "\\n\\n" + content + `<|eot_id|>`, then the assistant header.
Tools (see each class for where they go) use Llama 3.1's JSON tool-call format (workers/tool_calls.py).
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .errors import InvalidRequestError
from .tool_calls import builtin_tool_instructions, tool_call_text

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "ipython")
TOOL_ROLES = ("tool", "ipython")


# ---- messages ----------------------------------------------------------------------------------------------------

def validate_messages(messages: Any) -> list[dict]:
    """Checked copies of OpenAI chat messages, normalised for the templates:
    `{"role", "content": str | None, "name"?, "tool_calls"?: [{"id", "type": "function", "function": {"name",
    "arguments": str}}], "tool_call_id"?}`. Text content parts are joined with "\\n" (as vLLM does for templates
    that take string content); content may be missing or null only on an assistant message with tool calls."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
    return [_message(i, m) for i, m in enumerate(messages)]


def _message(i: int, m: Any) -> dict:
    at = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidRequestError(at, f"must be an object {{role, content}}, got {_type(m)}")
    role = m.get("role")
    if role not in ROLES:
        raise InvalidRequestError(f"{at}.role", f"must be one of {', '.join(map(repr, ROLES))}, got {role!r}")
    out: dict[str, Any] = {"role": role}
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise InvalidRequestError(f"{at}.name", f"must be a string, got {_type(m['name'])}")
        out["name"] = m["name"]
    if m.get("tool_calls") is not None:
        if role != "assistant":
            raise InvalidRequestError(f"{at}.tool_calls", f"only assistant messages carry tool calls, not {role!r}")
        calls = m["tool_calls"]
        if not isinstance(calls, list) or not calls:
            raise InvalidRequestError(f"{at}.tool_calls", "must be a non-empty list of tool calls")
        out["tool_calls"] = [_tool_call(f"{at}.tool_calls[{j}]", c) for j, c in enumerate(calls)]
    if role in TOOL_ROLES:
        call_id = m.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise InvalidRequestError(f"{at}.tool_call_id", "a tool message must name the call it answers "
                                                            f"(a string), got {_type(call_id)}")
        if call_id is not None:
            if not isinstance(call_id, str):
                raise InvalidRequestError(f"{at}.tool_call_id", f"must be a string, got {_type(call_id)}")
            out["tool_call_id"] = call_id
    content = m.get("content")
    if content is None:
        if "tool_calls" not in out:
            raise InvalidRequestError(f"{at}.content", "is required (only an assistant message with tool_calls "
                                                       "may leave it out)")
        out["content"] = None
    else:
        out["content"] = _content(f"{at}.content", content)
    return out


def _content(at: str, content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(at, f"must be a string or a list of content parts, got {_type(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise InvalidRequestError(f"{at}[{j}]", f"must be a content part {{type, text}}, got {_type(part)}")
        if part.get("type") != "text":
            raise InvalidRequestError(f"{at}[{j}].type", f"only 'text' content parts are supported, got "
                                                         f"{part.get('type')!r}")
        if not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"{at}[{j}].text", f"must be a string, got {_type(part.get('text'))}")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(at: str, call: Any) -> dict:
    if not isinstance(call, dict):
        raise InvalidRequestError(at, f"must be an object {{id, type, function}}, got {_type(call)}")
    if call.get("type", "function") != "function":
        raise InvalidRequestError(f"{at}.type", f"must be 'function', got {call.get('type')!r}")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise InvalidRequestError(f"{at}.id", f"must be a string, got {_type(call_id)}")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise InvalidRequestError(f"{at}.function", f"must be an object {{name, arguments}}, got {_type(fn)}")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidRequestError(f"{at}.function.name", f"must be a non-empty string, got {fn.get('name')!r}")
    args = fn.get("arguments", "{}")
    if isinstance(args, dict):  # a convenience: OpenAI sends a JSON string, some clients send the object
        args = json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise InvalidRequestError(f"{at}.function.arguments", f"must be a JSON string, got {_type(args)}")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    return {"id": call_id, **out} if call_id is not None else out


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _only_leading_system(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise InvalidRequestError(f"messages[{i}].role", "only the first message may be a system message")


def _assistant_text(m: dict) -> str:
    """An assistant turn's text: its content, then its calls in Llama 3.1's JSON format, one per line."""
    parts = [m["content"].strip()] if m.get("content") else []
    parts += [tool_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", ())]
    return "\n".join(parts)


# ---- the formats -------------------------------------------------------------------------------------------------

class ChatTemplate:
    name = "base"

    def encode(self, tok: "Tokenizer", messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> list[int]:
        """Token ids of validated `messages` (validate_messages) and validated `tools` (or None)."""
        raise NotImplementedError


class Llama2ChatTemplate(ChatTemplate):
    """Meta's Llama 2 chat format. Llama 2 has no tool format of its own: with tools, the Llama 3.1-style JSON
    instructions (tool_calls.builtin_tool_instructions) go into the system prompt, an assistant's calls are its
    answer in that JSON, and tool results are a user turn ("Result of <function>: <content>", merged with the
    user message that follows, so turns still alternate)."""
    name = "llama2"
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(self, tok, messages, add_generation_prompt=True, tools=None):
        _only_leading_system(messages)
        dialog = self._turns(messages)
        system = dialog.pop(0)["content"] if dialog and dialog[0]["role"] == "system" else None
        if tools:
            system = (system + "\n\n" if system else "") + builtin_tool_instructions(tools).rstrip()
        if system is not None:
            if not dialog:
                raise InvalidRequestError("messages", "a system message must be followed by a user message")
            dialog[0] = {**dialog[0], "content": self.B_SYS + system + self.E_SYS + dialog[0]["content"]}
        for i, m in enumerate(dialog):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise InvalidRequestError(f"messages[{m['index']}].role", "roles must alternate user/assistant "
                                                                         "(after an optional system message)")
        ids: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            ids += tok.encode(f"{self.B_INST} {prompt['content'].strip()} {self.E_INST} {answer['content'].strip()} ",
                              bos=True) + [tok.eos_id]
        if dialog[-1]["role"] == "user":
            ids += tok.encode(f"{self.B_INST} {dialog[-1]['content'].strip()} {self.E_INST}", bos=True)
        elif add_generation_prompt:
            raise InvalidRequestError(f"messages[{dialog[-1]['index']}].role",
                                      "the last message must be from the user (or a tool)")
        return ids

    @staticmethod
    def _turns(messages: list[dict]) -> list[dict]:
        """Messages as Llama 2 turns: tool results become user text, merged with the user turn they adjoin."""
        names = {c.get("id"): c["function"]["name"] for m in messages for c in m.get("tool_calls", ())}
        turns: list[dict] = []
        for i, m in enumerate(messages):
            role, text = m["role"], m["content"]
            if role in TOOL_ROLES:
                name = names.get(m.get("tool_call_id"))
                role, text = "user", (f"Result of {name}: " if name else "Tool result: ") + (text or "")
            elif role == "assistant":
                text = _assistant_text(m)
            if role == "user" and turns and turns[-1]["role"] == "user" and (
                    messages[i - 1]["role"] in TOOL_ROLES or m["role"] in TOOL_ROLES):
                turns[-1]["content"] += "\n\n" + text
                continue
            turns.append({"role": role, "content": text, "index": i})
        return turns


class Llama3ChatTemplate(ChatTemplate):
    """Meta's Llama 3 chat format; with tools, as the Hugging Face Llama 3.1 template lays them out: the JSON
    tool instructions open the first user message, an assistant's calls are its turn in Llama 3.1's JSON, and
    tool results are `ipython` turns."""
    name = "llama3"

    def encode(self, tok, messages, add_generation_prompt=True, tools=None):
        _only_leading_system(messages)
        sp = tok.special_tokens
        ids = [sp["<|begin_of_text|>"]]

        def header(role: str) -> list[int]:
            return [sp["<|start_header_id|>"]] + tok.encode(role, bos=False) + [sp["<|end_header_id|>"]] + \
                tok.encode("\n\n", bos=False)

        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None) if tools else None
        if tools and first_user is None:
            raise InvalidRequestError("messages", "tools are given to the model in the first user message; "
                                                  "there is none")
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                text = _assistant_text(m)
            else:
                text = m["content"].strip()
            if i == first_user:
                text = builtin_tool_instructions(tools) + text
            role = "ipython" if m["role"] in TOOL_ROLES else m["role"]
            ids += header(role) + tok.encode(text, bos=False) + [sp["<|eot_id|>"]]
        if add_generation_prompt:
            ids += header("assistant")
        return ids
