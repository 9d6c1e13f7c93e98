"""Structured outputs: constrain a request's tokens to a JSON schema, any JSON object, a regular expression,
a choice among strings or a context-free grammar.

The grammar engine is llguidance (guidance-ai, the library behind vLLM's and SGLang's "guidance" backend).
It was picked over xgrammar by measurement on Meta's Llama 3 vocabulary (128,256 tokens; docs/structured-
outputs.md has the figures): both compute a token mask in a few microseconds per token, but xgrammar spends
~0.4 s compiling each new JSON schema (it precomputes masks ahead of time) where llguidance builds its lexer
lazily in ~1 ms, and xgrammar pulls in transformers, triton and tvm-ffi while llguidance depends on nothing.

How the engine uses this module:
- `validate_structured(spec)`: the cheap edge check (no tokenizer needed), InvalidRequestError naming the
  problem. The ingress calls it before queueing; the engine's compile thread runs it again.
- `GrammarCompiler(tokenizer, vocab_size, eos_ids)`: one per engine. `compile(spec)` returns a Future of a
  compiled grammar, computed on a background thread (compile_threads() of them) and cached per spec (the
  tokenizer is fixed per engine, so the cache key (spec, tokenizer) is the spec). `GrammarCompiler.matcher(compiled)`
  starts a sequence.
- `GrammarMatcher`: one sequence's parser state; `accept(token)` after each sampled token.
- `allowed_tokens(matchers, vocab_size)`: the batch's [rows, vocab] boolean mask, computed in one call into
  llguidance (its own threads, without the GIL) and unpacked with a byte lookup table.

Grammar text (`grammar=`) is Lark syntax as llguidance extends it (https://github.com/guidance-ai/llguidance/
blob/main/docs/syntax.md, start rule `start`) or llama.cpp GBNF (start rule `root`), converted by
llguidance's own `gbnf_to_lark`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidRequestError

log = logging.getLogger(f"herd.{__name__}")

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_CHOICES = 1024
GRAMMAR_CACHE_SIZE = 256
# JSON is generated compactly (", " and ": " between items, no other whitespace): flexible whitespace lets a
# model that has not learned JSON (or a random one) emit blank lines forever inside a valid document.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class StructuredOutputs:
    """Exactly one constraint. `json_schema` is a dict or its JSON text; `json_object` is any JSON object;
    `choice` is one of the given strings, verbatim; `grammar` is Lark or GBNF text (see the module doc)."""
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            got = ", ".join(set_) if set_ else "none"
            raise InvalidRequestError("structured", f"give exactly one of {', '.join(KINDS)} (got {got})")
        if not isinstance(self.json_object, bool):
            raise InvalidRequestError("structured.json_object", f"must be a boolean, got {self.json_object!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, (dict, str)):
            raise InvalidRequestError("structured.json_schema",
                                      f"must be a JSON object (or its text), got {type(self.json_schema).__name__}")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise InvalidRequestError(f"structured.{name}", f"must be a non-empty string, got {v!r}")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice:
                raise InvalidRequestError("structured.choice", "must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise InvalidRequestError("structured.choice", f"at most {MAX_CHOICES} choices, got {len(self.choice)}")
            for c in self.choice:
                if not isinstance(c, str) or not c:
                    raise InvalidRequestError("structured.choice", f"choices must be non-empty strings, got {c!r}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StructuredOutputs":
        if isinstance(d, StructuredOutputs):
            return d
        if not isinstance(d, Mapping):
            raise InvalidRequestError("structured", f"must be a mapping with one of {', '.join(KINDS)}, "
                                                    f"got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in KINDS)
        if unknown:
            raise InvalidRequestError(f"structured.{unknown[0]}", f"unknown constraint (known: {', '.join(KINDS)})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Only the constraint that is set (so the dict reads like the request that made it)."""
        return {self.kind: getattr(self, self.kind)}

    def chars(self) -> int:
        """The constraint's size in characters (a schema given as a dict counts as its JSON text): what
        validating and compiling it cost grows with it, so the edge bounds it before either."""
        value = getattr(self, self.kind)
        if self.kind == "json_object":
            return 0
        if self.kind == "choice":
            return sum(len(c) if isinstance(c, str) else 0 for c in value)
        return len(value) if isinstance(value, str) else json_chars(value)

    def cache_key(self) -> str:
        value = getattr(self, self.kind)
        if self.kind == "json_schema" and isinstance(value, str):
            try:  # the same schema as text or as a dict compiles once
                value = json.loads(value)
            except ValueError:
                pass
        return self.kind + ":" + json.dumps(value, sort_keys=True)


def json_chars(value: Any) -> int:
    """Characters of `value` as JSON (0 for nothing, or for what is not JSON: validation names that)."""
    if not value:
        return 0
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError):
        return 0


def _llg():
    import llguidance  # imported on first use: only engines that serve constrained requests pay for it
    return llguidance


def grammar_text(spec: StructuredOutputs) -> str:
    """The llguidance grammar of a spec; InvalidRequestError if the spec cannot be turned into one."""
    llg = _llg()
    kind, param = spec.kind, f"structured.{spec.kind}"
    try:
        if kind == "json_schema":
            schema = spec.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise InvalidRequestError(param, f"not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise InvalidRequestError(param, f"a JSON schema must be an object, got {type(schema).__name__}")
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        if kind == "json_object":
            return llg.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
        if kind == "regex":
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            # Each choice is a Lark string literal (json.dumps escapes it the way Lark reads it).
            return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return llg.grammar_from("grammar", spec.grammar)  # Lark, or GBNF converted to Lark
    except InvalidRequestError:
        raise
    except (ValueError, TypeError) as e:  # llguidance's parse errors (GBNF conversion, malformed JSON)
        raise InvalidRequestError(param, str(e)) from None


def validate_structured(spec: StructuredOutputs | Mapping[str, Any] | None) -> None:
    """The edge check: raise InvalidRequestError(param, message) for a schema, regex, choice or grammar that
    cannot be compiled (unknown keywords, unsupported features, syntax errors), without a tokenizer."""
    if spec is None:
        return
    spec = StructuredOutputs.from_dict(spec)
    grammar = grammar_text(spec)
    is_error, messages = _llg().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequestError(f"structured.{spec.kind}", _readable(messages[0]))


def _readable(message: str, limit: int = 400) -> str:
    """One line a client can act on: llguidance's message without its parser-state and grammar dumps, the
    caret lines under a quoted source line, and the quoted lines of its generated grammar."""
    message = re.split(r"<state>|<grammar>", message)[0]
    kept = [ln.strip() for ln in message.splitlines()
            if ln.strip() and not re.fullmatch(r"\s*\^+\s*", ln) and not re.match(r"\s*\d+\s*\|", ln)]
    text = " ".join(kept) or "invalid grammar"
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---- per tokenizer -------------------------------------------------------------------------------------
def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: Sequence[int]):
    """llguidance's view of a herd Tokenizer: every id's bytes (special tokens marked with a 0xFF prefix, as
    llguidance expects), padded to the model's vocabulary, and the ids that end a generation."""
    llg = _llg()
    specials = set(tokenizer.special_tokens.values())
    tokens: list[bytes] = []
    for i in range(vocab_size):
        if i in specials:
            name = next((k for k, v in tokenizer.special_tokens.items() if v == i), "<special>")
            tokens.append(b"\xff" + name.encode())
        elif i < tokenizer.vocab_size:
            tokens.append(tokenizer.token_bytes(i))
        else:
            tokens.append(b"")  # padding rows of the embedding: never allowed

    class _Wrapped:
        def __init__(self):
            self.eos_token_id = tokenizer.eos_id
            self.bos_token_id = tokenizer.bos_id
            self.tokens = tokens
            self.special_token_ids = sorted(specials)

        def __call__(self, text):
            # llguidance tokenizes only for forced-token shortcuts, and needs ids whose bytes are exactly the
            # text. SentencePiece adds a dummy-prefix space at the start of a text, so fall back to the
            # byte pieces (<0xAB>) there.
            if isinstance(text, bytes):
                text = text.decode("utf-8", "replace")
            ids = tokenizer.encode(text, bos=False)
            if b"".join(tokens[i] for i in ids) == text.encode():
                return ids
            return _byte_pieces(tokens, text.encode()) or ids

    return llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped()), n_vocab=vocab_size, eos_token=sorted(eos_ids))


def _byte_pieces(tokens: list[bytes], data: bytes) -> list[int] | None:
    single = {t: i for i, t in enumerate(tokens) if len(t) == 1}
    try:
        return [single[bytes([b])] for b in data]
    except KeyError:
        return None


class GrammarError(Exception):
    """A sampled token the grammar does not allow (cannot happen under the mask; a bug if it does)."""


class GrammarMatcher:
    """One sequence's position in its grammar. `num_tokens` counts the tokens accepted, so the engine can
    check it matches the sequence's output (preemption recomputes the KV cache but keeps the output, so the
    matcher never needs to move back)."""

    def __init__(self, matcher):
        self._m = matcher
        self.num_tokens = 0

    def accept(self, token_id: int) -> None:
        if not self._m.consume_token(token_id):
            raise GrammarError(f"token {token_id} rejected by the grammar: {self._m.get_error()}")
        self.num_tokens += 1

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)
            self.num_tokens -= num_tokens

    @property
    def is_finished(self) -> bool:
        """The grammar is complete and nothing more can follow (or EOS was accepted)."""
        return self._m.is_stopped()

    @property
    def is_accepting(self) -> bool:
        return self._m.is_accepting()

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None

    @property
    def raw(self):
        return self._m


def compile_threads(cpus: int | None = None) -> int:
    """Grammar compile threads of one engine: at least two, so that one large schema (~0.5 s at
    limits.max_structured_chars) does not hold up every other constrained request's start behind it; at most
    four, a quarter of the cores, which stay the model's."""
    return min(4, max(2, (cpus or os.cpu_count() or 2) // 4))


class GrammarCompiler:
    """Compiles specs for one engine's tokenizer on background threads (never the engine's step loop), and
    keeps the last GRAMMAR_CACHE_SIZE compiled grammars, so a repeated schema starts at once."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], cache_size: int = GRAMMAR_CACHE_SIZE,
                 threads: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_ids = sorted(eos_ids)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads or compile_threads(), thread_name_prefix="herd-grammar")
        self._ll_tokenizer = None  # built at the first compile (~0.5 s for 128k tokens), once: _tokenizer_lock
        self._tokenizer_lock = threading.Lock()

    def compile(self, spec: StructuredOutputs) -> Future:
        """A Future of the compiled grammar; its exception is an InvalidRequestError for a bad spec."""
        key = spec.cache_key()
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[key] = fut
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, spec: StructuredOutputs):
        llg = _llg()
        with self._tokenizer_lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids)
        # The matcher's construction checks the grammar too (and does not raise: it reports an error state).
        template = llg.LLMatcher(self._ll_tokenizer, grammar_text(spec), log_level=0)
        if template.is_error():
            raise InvalidRequestError(f"structured.{spec.kind}", _readable(template.get_error()))
        return template

    @staticmethod
    def matcher(compiled) -> GrammarMatcher:
        """A fresh matcher for one sequence (a copy of the compiled template, which stays at the start)."""
        return GrammarMatcher(compiled.deep_copy())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- the batch's mask ----------------------------------------------------------------------------------
_executor = None
_executor_lock = threading.Lock()


def _mask_executor():
    global _executor
    with _executor_lock:
        if _executor is None:
            # Masks of a batch are computed in parallel without the GIL; a few threads are plenty (each mask
            # takes microseconds) and leave the cores to the model.
            _executor = _llg().LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) // 2)))
        return _executor


def allowed_tokens(matchers: Sequence[GrammarMatcher], vocab_size: int):
    """Bool torch tensor [len(matchers), vocab_size]: the tokens each matcher allows next."""
    import torch  # here, so the edge's validate_structured does not import torch
    words = (vocab_size + 31) // 32
    bitmask = np.zeros((len(matchers), words), dtype=np.int32)
    _mask_executor().unsafe_compute_mask_ptr([(m.raw, i) for i, m in enumerate(matchers)],
                                             bitmask.ctypes.data, words * 4, len(matchers))
    # llguidance's bitmask is little-endian int32 words, token t at bit t % 32 of word t // 32: read as bytes,
    # bit t % 8 of byte t // 8, which numpy unpacks in one pass (20x faster than a torch lookup table).
    bits = np.unpackbits(bitmask.view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bool)


__all__ = ["GrammarCompiler", "GrammarError", "GrammarMatcher", "StructuredOutputs", "allowed_tokens",
           "grammar_text", "json_chars", "validate_structured"]
