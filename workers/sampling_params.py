"""SamplingParams: what one request asks of sampling, validated where it is built (per request, so cheap).

Its fields are the one list of sampling parameters: the gRPC proto mirrors them (tests/test_proto.py), the OpenAI
routes take the body fields of the same names (cluster/openai_http.py), and `herd client` / `herd generate` build
their flags from the fields' names, types, defaults and `metadata["help"]` (cluster/client.py).

Light on purpose (no torch, no numpy): the client and the CLI read the fields without loading the engine. The
sampler that applies them is workers/sampling.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .structured_output import StructuredOutputs

MAX_LOGPROBS = 20
MAX_N = 16                  # completions per prompt
MAX_LOGIT_BIAS = 100.0      # OpenAI's range for logit_bias values: [-100, 100]
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (and the proto's uint64)
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5


def _param(default: Any = None, help: str = "", *, factory: Any = None, cli: bool = True) -> Any:
    """A SamplingParams field with its help text; cli=False keeps it off the command line (the CLI prints one
    completion's text and no logprobs)."""
    metadata = {"help": help, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SamplingParams:
    max_tokens: int | None = _param(16, "tokens to generate (None: until the context ends)")
    temperature: float = _param(1.0, "0 = greedy")
    top_p: float = _param(1.0, "sample from the smallest set of tokens whose probability reaches this (1 = off)")
    top_k: int = _param(-1, "sample from the k most likely tokens (-1 or 0 = off)")
    min_p: float = _param(0.0, "drop tokens less likely than this times the most likely one's probability")
    seed: int | None = _param(None, "seed of this request's own random stream (reproducible sampling)")
    stop: list[str] = _param(help="stop strings (not part of the output)", factory=list)
    stop_token_ids: list[int] = _param(help="token ids that end the output", factory=list)
    ignore_eos: bool = _param(False, "keep generating past the end-of-sequence token")
    presence_penalty: float = _param(0.0, "OpenAI presence penalty over the output tokens, in [-2, 2]")
    frequency_penalty: float = _param(0.0, "OpenAI frequency penalty over the output tokens, in [-2, 2]")
    repetition_penalty: float = _param(1.0, "Hugging Face repetition penalty over prompt + output (1 = off)")
    logprobs: int | None = _param(None, "top-N log-probabilities of each output token", cli=False)
    n: int = _param(1, f"completions sampled from the prompt (1..{MAX_N})", cli=False)
    logit_bias: dict[int, float] = _param(help="token id -> added to its logit", factory=dict, cli=False)
    prompt_logprobs: int | None = _param(None, "top-N log-probabilities of each prompt token", cli=False)
    structured: StructuredOutputs | None = _param(None, "a grammar the output must follow", cli=False)

    def __post_init__(self) -> None:
        # Normalise the list fields first (a single stop string, None, tuples) so validate() sees lists.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.structured is not None:
            from .structured_output import StructuredOutputs  # numpy: only for a request that has a grammar

            if not isinstance(self.structured, StructuredOutputs):
                self.structured = StructuredOutputs.from_dict(self.structured)  # the dict form (JSON, Ray hops)
        self.validate()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamplingParams":
        if not isinstance(d, Mapping):
            raise InvalidRequestError("sampling", f"must be a mapping of names to values, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InvalidRequestError(str(key), f"unknown sampling parameter (known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (lists, dicts, numbers, strings), so it crosses Ray hops and JSON alike;
        from_dict(to_dict()) gives an equal SamplingParams."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stop"], d["stop_token_ids"], d["logit_bias"] = list(self.stop), list(self.stop_token_ids), dict(self.logit_bias)
        d["structured"] = self.structured.to_dict() if self.structured is not None else None
        return d

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def needs_mask(self) -> bool:
        """Does sampling restrict or shift the vocabulary (a grammar or a logit bias)?"""
        return self.structured is not None or bool(self.logit_bias)

    def validate(self) -> None:
        if self.max_tokens is not None:
            _int(self, "max_tokens", minimum=1)
        _real(self, "temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)")
        _real(self, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        _int(self, "top_k", minimum=-1)  # -1 and 0 both mean "off"
        _real(self, "min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        if self.seed is not None:
            _int(self, "seed", minimum=0, maximum=MAX_SEED)
        _real(self, "presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        _real(self, "frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        _real(self, "repetition_penalty", lambda v: v > 0, "must be > 0 (1 = off)")
        if self.logprobs is not None:
            _int(self, "logprobs", minimum=0, maximum=MAX_LOGPROBS)
        _int(self, "n", minimum=1, maximum=MAX_N)
        if self.prompt_logprobs is not None:
            _int(self, "prompt_logprobs", minimum=0, maximum=MAX_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", f"must be a boolean, got {self.ignore_eos!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidRequestError("stop_token_ids", f"{t!r} is not a token id")


def _logit_bias(value: Any) -> dict[int, float]:
    """{token id: bias} with int ids (JSON object keys arrive as strings) and finite values in
    [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]. Ids beyond the vocabulary are the engine's to refuse (it knows it)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError("logit_bias", f"must be a mapping of token ids to numbers, got {type(value).__name__}")
    out: dict[int, float] = {}
    for key, bias in value.items():
        token = key
        if isinstance(key, str):
            try:
                token = int(key.strip())
            except ValueError:
                raise InvalidRequestError("logit_bias", f"{key!r} is not a token id") from None
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidRequestError("logit_bias", f"{key!r} is not a token id")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias) \
                or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise InvalidRequestError("logit_bias", f"bias of token {token} must be a number in "
                                                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}")
        out[token] = float(bias)
    return out


def _as_list(value: Any, name: str) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InvalidRequestError(name, f"must be a list, got {type(value).__name__}")


def _int(p: SamplingParams, name: str, minimum: int, maximum: int | None = None) -> None:
    v = getattr(p, name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidRequestError(name, f"must be an integer, got {v!r}")
    if v < minimum or (maximum is not None and v > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InvalidRequestError(name, f"must be {bound}, got {v}")


def _real(p: SamplingParams, name: str, ok, message: str) -> None:
    v = getattr(p, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidRequestError(name, f"must be a finite number, got {v!r}")
    if not ok(v):
        raise InvalidRequestError(name, f"{message}, got {v}")
    setattr(p, name, float(v))
