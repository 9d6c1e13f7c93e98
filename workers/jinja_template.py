"""A checkpoint's own chat template (Jinja), rendered and tokenized the way Hugging Face `transformers` does.

Where it comes from (transformers' precedence): `chat_template.jinja` in the checkpoint folder (plus named ones in
`additional_chat_templates/NAME.jinja`), else `chat_template` in `tokenizer_config.json`: a string, or a list of
`{name, template}`. With several templates, "tool_use" is used when tools are given (if there is one), else
"default".

Rendering (transformers' `utils/chat_template_utils.py`): an `ImmutableSandboxedEnvironment` with
trim_blocks / lstrip_blocks and the loopcontrols extension; `raise_exception(msg)`, `strftime_now(fmt)`, a
`tojson` that does not HTML-escape (json.dumps with ensure_ascii=False, indent, separators, sort_keys), a
`namespace` that refuses underscore attributes; variables `messages`, `tools`, `documents` (None),
`add_generation_prompt`, and the special tokens `bos_token`, `eos_token`, `unk_token`, `pad_token` named in
tokenizer_config.json. Messages are validate_messages' (content as one string, None values left out, as
transformers drops them); an assistant's tool-call `arguments` are passed as the JSON object they encode
(templates write them with `tojson`, as Hugging Face's docs ask), a string only when they are not JSON.

Tokenizing: no bos is added (a template writes its own); special-token text the template writes becomes the
special token, while special-token text inside the user's strings (messages, tools) stays plain text - exactly
transformers' `apply_chat_template(..., sanitize_control_tokens=True)`, so nobody can forge a turn boundary.
A template that fails (a syntax error, `raise_exception`, a sandbox violation, an undefined operation) is an
InvalidRequestError("messages", <its message>).
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat_template import ChatTemplate
from .errors import InvalidRequestError, TokenizerError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
TEMPLATE_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
# Private-use characters that wrap special-token text found in user strings (transformers uses the same two).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"


class JinjaChatTemplate(ChatTemplate):
    """A checkpoint's Jinja chat template(s); `templates` maps a name to its source ("default" for a single one)."""
    name = "jinja"

    def __init__(self, templates: dict[str, str], template_tokens: dict[str, str], source: str):
        self.templates = templates
        self.template_tokens = template_tokens  # bos_token / eos_token / ... -> text
        self.source = source                    # where the template came from, for messages

    def template_for(self, tools: list[dict] | None) -> str:
        if len(self.templates) == 1 and "default" in self.templates:
            return self.templates["default"]
        if tools and "tool_use" in self.templates:
            return self.templates["tool_use"]
        if "default" in self.templates:
            return self.templates["default"]
        raise InvalidRequestError("messages", f"the model's chat templates ({', '.join(sorted(self.templates))}, "
                                              f"from {self.source}) have no 'default'")

    def render(self, tok: "Tokenizer", messages: list[dict], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        """The prompt text, with special-token text from the user's strings wrapped in MARK_START / MARK_END."""
        source = self.template_for(tools)
        mark = _marker(tok)
        variables = {
            **self.template_tokens,
            "messages": mark([_template_message(m) for m in messages]),
            "tools": mark(tools) if tools else None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return _compile(source).render(**variables)
        except jinja2.TemplateError as e:
            raise InvalidRequestError("messages", f"the model's chat template failed: {e.message or e}") from None
        except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError, RecursionError) as e:
            raise InvalidRequestError("messages", f"the model's chat template failed: "
                                                  f"{type(e).__name__}: {e}") from None

    def encode(self, tok, messages, add_generation_prompt=True, tools=None):
        return encode_marked(tok, self.render(tok, messages, add_generation_prompt, tools))


# ---- loading -----------------------------------------------------------------------------------------------------

def load_chat_template(folder: str | Path) -> JinjaChatTemplate | None:
    """The chat template a checkpoint folder ships, or None (then the built-in Meta format applies)."""
    root = Path(folder)
    config: dict = {}
    config_path = root / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{config_path}: not JSON ({type(e).__name__}: {e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: not a JSON object")
    templates: dict[str, str] = {}
    source = ""
    if (root / CHAT_TEMPLATE_FILE).is_file():
        templates["default"] = (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        source = str(root / CHAT_TEMPLATE_FILE)
    if (root / CHAT_TEMPLATE_DIR).is_dir():
        for path in sorted((root / CHAT_TEMPLATE_DIR).glob("*.jinja")):
            templates[path.stem] = path.read_text(encoding="utf-8")
            source = source or str(root / CHAT_TEMPLATE_DIR)
    if not templates:
        templates = _config_templates(config.get("chat_template"), config_path)
        source = f"{config_path} chat_template"
    if not templates:
        return None
    for name, text in templates.items():
        _check_compiles(text, f"{source} ({name})")
    return JinjaChatTemplate(templates, _template_tokens(config, config_path), source)


def _config_templates(value: Any, where: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{where}: chat_template must be a string or a list of {{name, template}}")


def _template_tokens(config: dict, where: Path) -> dict[str, str]:
    """bos_token / eos_token / ... as tokenizer_config.json names them: a string or an AddedToken dict."""
    out = {}
    for key in TEMPLATE_TOKEN_NAMES:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is None:
            continue
        if not isinstance(value, str):
            raise TokenizerError(f"{where}: {key} must be a string or {{content: ...}}")
        out[key] = value
    return out


def _check_compiles(text: str, where: str) -> None:
    try:
        _compile(text)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: chat template does not compile (line {e.lineno}: {e.message})") from None


# ---- the Jinja environment, as transformers builds it ------------------------------------------------------------

@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '); chat templates need the JSON as it is.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in a template, without the dict type itself (no attribute tricks through it)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (no way to CPython internals through it)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it for training masks):
    rendered as its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


# ---- what the template sees --------------------------------------------------------------------------------------

def _template_message(m: dict) -> dict:
    """A validated message as a template expects it: None values dropped, call arguments as JSON objects."""
    out = {k: v for k, v in m.items() if v is not None}
    if "tool_calls" in out:
        out["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                             for c in out["tool_calls"]]
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- special tokens in user strings (transformers' mark_control_tokens / encode_marked_chat) -----------------------

def _marker(tok: "Tokenizer"):
    pattern = _control_token_patterns(tuple(tok.chat_control_tokens))[0]

    def mark(obj: Any) -> Any:
        if isinstance(obj, str):
            # Markers already in the text are dropped first, so they cannot forge a marked token.
            obj = obj.replace(MARK_START, "").replace(MARK_END, "")
            return pattern.sub(f"{MARK_START}\\g<0>{MARK_END}", obj)
        if isinstance(obj, dict):
            return {key: mark(value) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [mark(value) for value in obj]
        return obj

    return mark


@lru_cache(maxsize=8)
def _control_token_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(any control token, a marked control token or a lone marker); longer tokens first."""
    longest_first = sorted(tokens, key=len, reverse=True)
    any_token = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    marked = re.compile(f"{MARK_START}({any_token.pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
    return any_token, marked


def encode_marked(tok: "Tokenizer", text: str) -> list[int]:
    """Ids of a rendered chat: marked special-token text as plain text, the rest with special tokens recognised.

    As transformers does it: the text is cut at the markers (a lone marker, left by a template that split a
    marked string, still cuts, so the text on both sides cannot join into a special token); every piece after
    the first is encoded after a "\\n" that is then taken off again, so SentencePiece adds no prefix space there.
    """
    pieces = _control_token_patterns(tuple(tok.chat_control_tokens))[1].split(text)
    ids = tok.encode_with_special_tokens(pieces[0])
    newline = tok.encode_with_special_tokens("\n")
    for i, piece in enumerate(pieces[1:], start=1):
        if not piece:
            continue
        as_text = i % 2 == 1  # odd pieces are the marked tokens
        encode = (lambda s: tok.encode(s, bos=False)) if as_text else tok.encode_with_special_tokens
        piece_ids = encode("\n" + piece)
        ids += piece_ids[len(newline):] if piece_ids[:len(newline)] == newline else encode(piece)
    return ids
