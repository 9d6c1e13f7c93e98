"""OpenAI tool calling for Llama models: validating `tools` / `tool_choice`, the JSON schema that makes a grammar
force a call, the tool instructions of the built-in chat formats, and parsing calls back out of generated text.

The wire format is Llama 3.1's JSON tool call (what Meta's and the Hugging Face Llama 3.1/3.2 templates ask for):
the assistant's whole answer is `{"name": "<function>", "parameters": {...}}`, optionally after the
`<|python_tag|>` token; several calls are separated by ";" or newlines. `parse_tool_calls` also takes
"arguments" for "parameters" and a JSON list of calls, as fine-tunes write them.

What herd does with `tool_choice`:
- "none": tools are not rendered into the prompt and nothing is parsed (plain chat).
- "auto": tools are rendered; the answer is parsed, and is a tool call only when it is one as a whole.
- "required" / a named function: tools are rendered and `tool_call_json_schema` gives the schema that the
  grammar engine enforces, so the answer always parses into one call (of the named function). `strict` on a
  function changes nothing more here: its schema is enforced exactly when the choice forces a call.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import InvalidRequestError

MAX_TOOLS = 128                                   # OpenAI's limit on `tools`
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
PYTHON_TAG = "<|python_tag|>"                    # Llama 3.1: "a tool call follows" (ipython mode)
TOOL_CHOICE_MODES = ("auto", "none", "required")
_ID_ALPHABET = string.ascii_letters + string.digits
# OpenAI: "omitting parameters defines a function with an empty parameter list".
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# Parameter schemas already found valid (SHA-256 of their sorted JSON text), most recent last. Edges check
# tools in worker threads, hence the lock.
CHECKED_SCHEMAS_CACHE_SIZE = 1024
_checked_schemas: OrderedDict[bytes, None] = OrderedDict()
_checked_lock = threading.Lock()


# ---- validating the request --------------------------------------------------------------------------------------

def validate_tools(tools: Any) -> list[dict]:
    """OpenAI tool definitions, checked and normalised to
    `{"type": "function", "function": {"name", "description"?, "parameters"?, "strict"?}}` (unknown keys are
    dropped). `parameters` must be a JSON schema (checked against the Draft 2020-12 meta-schema) for an object.
    Errors are InvalidRequestError naming the field, e.g. "tools[1].function.name"."""
    from jsonschema.exceptions import SchemaError

    if not isinstance(tools, list):
        raise InvalidRequestError("tools", f"must be a list of tool definitions, got {_type(tools)}")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError("tools", f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}")
    out: list[dict] = []
    seen: dict[str, int] = {}
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequestError(at, f"must be an object {{type, function}}, got {_type(tool)}")
        if tool.get("type") != "function":
            raise InvalidRequestError(f"{at}.type", f"must be 'function', got {tool.get('type')!r}")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidRequestError(f"{at}.function", f"must be an object {{name, description, parameters}}, "
                                                        f"got {_type(fn)}")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise InvalidRequestError(f"{at}.function.name", "must be 1 to 64 letters, digits, '_' or '-', "
                                                             f"got {name!r}")
        if name in seen:
            raise InvalidRequestError(f"{at}.function.name", f"{name!r} is already the name of tools[{seen[name]}]")
        seen[name] = i
        clean: dict[str, Any] = {"name": name}
        if "description" in fn and fn["description"] is not None:
            if not isinstance(fn["description"], str):
                raise InvalidRequestError(f"{at}.function.description",
                                          f"must be a string, got {_type(fn['description'])}")
            clean["description"] = fn["description"]
        if "parameters" in fn and fn["parameters"] is not None:
            params = fn["parameters"]
            where = f"{at}.function.parameters"
            if not isinstance(params, dict):
                raise InvalidRequestError(where, f"must be a JSON schema object, got {_type(params)}")
            try:
                _check_parameters_schema(params)
            except SchemaError as e:
                raise InvalidRequestError(where + _json_path(e.absolute_path),
                                          f"not a valid JSON schema: {e.message}") from None
            if params.get("type", "object") != "object":
                raise InvalidRequestError(f"{where}.type", "function arguments are a JSON object: must be "
                                                           f"'object', got {params['type']!r}")
            clean["parameters"] = params
        if "strict" in fn and fn["strict"] is not None:
            if not isinstance(fn["strict"], bool):
                raise InvalidRequestError(f"{at}.function.strict", f"must be a boolean, got {_type(fn['strict'])}")
            clean["strict"] = fn["strict"]
        out.append({"type": "function", "function": clean})
    return out


def _check_parameters_schema(params: dict) -> None:
    """jsonschema's meta-schema check (SchemaError if invalid), once per distinct schema: it takes ~3 ms for a
    ten-argument function, and clients send the same tools with every request of a conversation."""
    from jsonschema import Draft202012Validator

    try:  # the digest, not the text: the cache's size must not depend on how large clients' schemas are
        key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).digest()
    except (TypeError, ValueError):  # not JSON (a client cannot send that): checked, never cached
        key = None
    with _checked_lock:
        if key is not None and key in _checked_schemas:
            _checked_schemas.move_to_end(key)
            return
    Draft202012Validator.check_schema(params)
    if key is None:
        return
    with _checked_lock:
        _checked_schemas[key] = None
        while len(_checked_schemas) > CHECKED_SCHEMAS_CACHE_SIZE:
            _checked_schemas.popitem(last=False)


def validate_tool_choice(tool_choice: Any, tools: list[dict] | None) -> str | dict:
    """`tool_choice` checked against the (validated) tools: "auto" | "none" | "required" |
    {"type": "function", "function": {"name": <one of the tools>}}. None means OpenAI's default: "auto" when
    there are tools, else "none". "required" or a named function without tools is an error."""
    tools = tools or []
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in TOOL_CHOICE_MODES:
            raise InvalidRequestError("tool_choice", f"must be one of {', '.join(map(repr, TOOL_CHOICE_MODES))} or "
                                                     f"{{type: 'function', function: {{name}}}}, got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise InvalidRequestError("tool_choice", "'required' needs at least one tool in 'tools'")
        return tool_choice
    if not isinstance(tool_choice, dict):
        raise InvalidRequestError("tool_choice", f"must be a string or an object, got {_type(tool_choice)}")
    if tool_choice.get("type") != "function":
        raise InvalidRequestError("tool_choice.type", f"must be 'function', got {tool_choice.get('type')!r}")
    fn = tool_choice.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequestError("tool_choice.function.name", "must name the function to call")
    names = tool_names(tools)
    if fn["name"] not in names:
        known = ", ".join(map(repr, names)) or "none"
        raise InvalidRequestError("tool_choice.function.name",
                                  f"{fn['name']!r} is not one of the tools (tools: {known})")
    return {"type": "function", "function": {"name": fn["name"]}}


def tool_names(tools: Iterable[dict | str] | None) -> list[str]:
    """The function names of validated tools (plain names are accepted too)."""
    return [t if isinstance(t, str) else t["function"]["name"] for t in tools or ()]


# ---- the schema a grammar enforces -------------------------------------------------------------------------------

def tool_call_json_schema(tools: list[dict] | None, tool_choice: str | dict | None) -> dict | None:
    """The JSON schema of the one tool call that `tool_choice` forces, in Llama 3.1's format
    `{"name": <function>, "parameters": {...}}`: for a named function its own call, for "required" an anyOf over
    every tool's call. None for "auto" / "none" (nothing is forced). Each function's `parameters` schema is
    embedded as it is (a function without `parameters` takes none: `{}`); its local `$ref`s are rewritten so
    that they still point inside it (a `$defs` of a function moves to the root under a per-function prefix)."""
    tool_choice = validate_tool_choice(tool_choice, tools)
    if tool_choice in ("auto", "none"):
        return None
    tools = tools or []
    if isinstance(tool_choice, dict):
        chosen = [t for t in tools if t["function"]["name"] == tool_choice["function"]["name"]]
    else:
        chosen = list(tools)
    defs: dict[str, Any] = {}
    calls = []
    for tool in chosen:
        i = tools.index(tool)
        path = "#/properties/parameters" if len(chosen) == 1 else f"#/anyOf/{len(calls)}/properties/parameters"
        params = _relocate_refs(tool["function"].get("parameters", NO_PARAMETERS), path, f"tool{i}_", defs)
        calls.append({"type": "object",
                      "properties": {"name": {"const": tool["function"]["name"]}, "parameters": params},
                      "required": ["name", "parameters"], "additionalProperties": False})
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "$defs": defs} if defs else schema


_NOT_SCHEMAS = ("const", "enum", "default", "examples")  # keywords whose values are data, not subschemas


def _relocate_refs(schema: Any, path: str, prefix: str, defs: dict) -> Any:
    """A copy of a function's parameter schema that works embedded at JSON pointer `path` of a bigger schema:
    its `$defs` / `definitions` move into `defs` (the root's) as `prefix + name`, refs to them follow, and other
    local refs ("#", "#/properties/...") get `path` in front."""
    def rewrite(ref: str) -> str:
        for key in ("#/$defs/", "#/definitions/"):
            if ref.startswith(key):
                return "#/$defs/" + prefix + ref[len(key):]
        return path + ref[1:] if ref.startswith("#") else ref

    def walk(node: Any, top: bool) -> Any:
        if isinstance(node, list):
            return [walk(item, False) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if top and key in ("$defs", "definitions") and isinstance(value, dict):
                for name, sub in value.items():
                    defs[prefix + name] = walk(sub, False)
            elif key == "$ref" and isinstance(value, str):
                out[key] = rewrite(value)
            elif key in _NOT_SCHEMAS:
                out[key] = value
            else:
                out[key] = walk(value, False)
        return out

    return walk(schema, True)


# ---- rendering tools into a built-in chat format -----------------------------------------------------------------

def builtin_tool_instructions(tools: list[dict]) -> str:
    """The tool instructions the built-in formats put before the user's question, worded as the Hugging Face
    Llama 3.1 template words them (tools in the user turn): each function definition as indented JSON."""
    text = ("Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            'value}.Do not use variables.\n\n')
    for tool in tools:
        text += json.dumps(tool, ensure_ascii=False, indent=4) + "\n\n"
    return text


def tool_call_text(name: str, arguments: str | dict) -> str:
    """One call as the Llama 3.1 format writes it (for replaying an assistant's earlier calls in a prompt)."""
    return json.dumps({"name": name, "parameters": _arguments_object(arguments)}, ensure_ascii=False)


def _arguments_object(arguments: str | dict) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


# ---- parsing calls out of generated text -------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolCall:
    """One parsed call, as OpenAI returns it: `arguments` is a JSON string of an object."""
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedToolCalls:
    """What an answer says: its text content (None when it is tool calls), and the calls (possibly none)."""
    content: str | None
    tool_calls: list[ToolCall]


def new_tool_call_id() -> str:
    """ "call_" + 24 random letters and digits, the shape of OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def parse_tool_calls(text: str, tools: Iterable[dict | str] | None) -> ParsedToolCalls:
    """The tool calls of a whole answer, or the answer as content. Never raises.

    The answer is tool calls when, after leading whitespace and an optional `<|python_tag|>`, all of it is one or
    more JSON calls `{"name": ..., "parameters" | "arguments": {...}}` (or a JSON list of them) separated by ";",
    newlines or spaces, and every name is one of `tools`. Anything else (unknown function, text around the JSON,
    invalid JSON) is plain content: `ParsedToolCalls(content=text, tool_calls=[])`."""
    names = set(tool_names(tools))
    calls = _calls_in(text, names) if names else None
    if not calls:
        return ParsedToolCalls(content=text, tool_calls=[])
    return ParsedToolCalls(content=None, tool_calls=[ToolCall(new_tool_call_id(), name, args) for name, args in calls])


_SEPARATORS = " \t\r\n;"
_decoder = json.JSONDecoder()


def _calls_in(text: str, names: set[str]) -> list[tuple[str, str]] | None:
    body = text.lstrip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):]
    if not body.lstrip().startswith(("{", "[")):
        return None
    pos, calls = 0, []
    while True:
        while pos < len(body) and body[pos] in _SEPARATORS:
            pos += 1
        if pos == len(body):
            return calls or None
        try:
            value, pos = _decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _one_call(item, names)
            if call is None:
                return None
            calls.append(call)


def _one_call(item: Any, names: set[str]) -> tuple[str, str] | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    if set(item) - {"name", "parameters", "arguments", "type"} or item.get("type", "function") != "function":
        return None
    args = item.get("parameters", item.get("arguments", {}))
    if isinstance(args, str):  # some fine-tunes write OpenAI's stringified arguments
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return item["name"], json.dumps(args, ensure_ascii=False)


class ToolCallStreamParser:
    """Tool calls out of a streamed answer, letting plain content through as it comes.

    Feed it the text deltas of one answer; `feed` returns the content to send on now:
    - While the answer is only whitespace so far, that whitespace is held (a call may follow it).
    - If the first non-whitespace text is `{`, `[` or (a prefix of) `<|python_tag|>`, the answer may be a tool
      call: everything from then on is held, and `feed` returns "". It is let go as content (all of it, then
      every later delta) as soon as it can no longer be one: `<|python_tag|>` followed by something other than
      JSON, or a first complete JSON value that is not a call of one of the tools.
    - Otherwise the answer is content: the held text and every later delta are returned as they come.
    `finish()` ends the answer: a held answer that parses as tool calls (`parse_tool_calls`) gives
    `ParsedToolCalls(None, calls)`; otherwise its `content` is the text not yet returned by `feed` (possibly "")
    and `tool_calls` is empty. So the deltas plus finish's content are always the whole answer when it is not a
    tool call, wherever the deltas were cut, and the calls are the same as `parse_tool_calls(whole_text)`'s.
    """

    def __init__(self, tools: Iterable[dict | str] | None):
        self.names = tool_names(tools)
        # Held text as pieces, joined only when it is decoded or let go: appending to one string copies it
        # each time, and an answer can be 100k tokens long.
        self._held: list[str] = []
        self._state = "undecided" if self.names else "content"  # -> "content" | "maybe_call"
        self._first_value = _FirstJsonValue()
        self._decided = False  # the first JSON value has been decoded (and it is a call, or broken)
        self._tag_begun = False  # undecided: the start of <|python_tag|> is held

    def feed(self, delta: str) -> str:
        if self._state == "content":
            return delta
        self._held.append(delta)
        if self._state == "undecided":
            if not delta.strip() and not self._tag_begun:
                return ""  # only whitespace so far
            head = self._text().lstrip()   # short: whitespace, then at most a tag's length
            if head[0] in "{[" or head.startswith(PYTHON_TAG):
                self._state = "maybe_call"
                return self._let_go() if self._cannot_be_a_call(self._text()) else ""
            if PYTHON_TAG.startswith(head):
                self._tag_begun = True
                return ""  # "<|pyth..." so far: wait for the rest of the tag
            return self._let_go()
        return self._let_go() if self._cannot_be_a_call(delta) else ""

    def _cannot_be_a_call(self, new_text: str) -> bool:
        """Whether the held text fails parse_tool_calls whatever follows it. Each character is looked at once:
        the held text is decoded only when `new_text` ends its first JSON value (re-decoding it at every
        closing bracket cost 2.5 s for a 107 KB answer, all of it on the ingress's event loop)."""
        if self._decided:
            return False
        if not self._first_value.opened:
            body = self._json_text()   # short until the value opens: whitespace and the tag
            if body and body[0] not in "{[":
                return True
        if not self._first_value.ends_in(new_text):
            return False
        self._decided = True
        body = self._json_text()
        try:  # an object or list ends at its closing bracket: text that follows cannot change it
            value, _ = _decoder.raw_decode(body)
        except json.JSONDecodeError:
            return False  # broken: finish() will tell
        names = set(self.names)
        return any(_one_call(item, names) is None for item in (value if isinstance(value, list) else [value]))

    def _json_text(self) -> str:
        """The held text from its first JSON character on (after whitespace and <|python_tag|>)."""
        body = self._text().lstrip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].lstrip()
        return body

    def _text(self) -> str:
        if len(self._held) > 1:
            self._held = ["".join(self._held)]
        return self._held[0] if self._held else ""

    def _let_go(self) -> str:
        self._state = "content"
        out, self._held = self._text(), []
        return out

    @property
    def buffering(self) -> bool:
        """Whether text is being held back (the answer may still be a tool call)."""
        return self._state != "content" and any(self._held)

    def finish(self) -> ParsedToolCalls:
        held, self._held = self._text(), []
        if self._state == "maybe_call":
            parsed = parse_tool_calls(held, self.names)
            if parsed.tool_calls:
                return parsed
        self._state = "content"
        return ParsedToolCalls(content=held, tool_calls=[])


class _FirstJsonValue:
    """Where the first JSON object or list of a text fed piece by piece ends: brackets counted outside
    strings (escapes inside them skipped), each character looked at once."""
    _STRUCTURE = re.compile(r'["\\{}\[\]]')

    def __init__(self) -> None:
        self.depth = 0
        self.opened = False       # its first bracket has arrived
        self._in_string = False
        self._escape_next = False  # the previous piece ended with a backslash inside a string

    def ends_in(self, piece: str) -> bool:
        """Whether `piece` (the text after the previous one) holds the bracket that closes the first value."""
        escaped = 0 if self._escape_next else -1   # the index in `piece` of a character a backslash escapes
        self._escape_next = False
        for match in self._STRUCTURE.finditer(piece):
            i, char = match.start(), match.group()
            if i == escaped:
                continue
            if self._in_string:
                if char == "\\":
                    escaped = i + 1
                    self._escape_next = escaped == len(piece)
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self.depth += 1
                self.opened = True
            else:
                self.depth -= 1
                if self.depth <= 0:
                    return True
        return False


# ---- helpers -----------------------------------------------------------------------------------------------------

def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _json_path(path: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
