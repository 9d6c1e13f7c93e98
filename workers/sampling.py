"""Sampling: request parameters, the batched sampler, and stop-string handling.

Order of operations follows vLLM: log-probabilities are taken from the raw model distribution; then
repetition penalty (HF semantics, over prompt + output), frequency/presence penalties (OpenAI semantics,
over output tokens); greedy rows take the argmax; the others apply temperature, top-k, top-p, min-p and
draw. A seeded request draws from its own torch.Generator, so its tokens do not depend on what else shares
the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch

from .errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SamplingParams":
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise InvalidRequestError(key, f"unknown sampling parameter (known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        _int(self, "max_tokens", minimum=1)
        _real(self, "temperature", lambda v: v >= 0, "must be >= 0 (0 = greedy)")
        _real(self, "top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        _int(self, "top_k", minimum=-1)
        _real(self, "min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        if self.seed is not None:
            _int(self, "seed", minimum=0)
        _real(self, "presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        _real(self, "frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        _real(self, "repetition_penalty", lambda v: v > 0, "must be > 0 (1 = off)")
        if self.logprobs is not None:
            _int(self, "logprobs", minimum=0, maximum=MAX_LOGPROBS)
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", "must be a boolean")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise InvalidRequestError("stop_token_ids", f"{t!r} is not a token id")


def _int(p: SamplingParams, name: str, minimum: int, maximum: int | None = None) -> None:
    v = getattr(p, name)
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidRequestError(name, f"must be an integer, got {v!r}")
    if v < minimum or (maximum is not None and v > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise InvalidRequestError(name, f"must be {bound}, got {v}")


def _real(p: SamplingParams, name: str, ok, message: str) -> None:
    v = getattr(p, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
        raise InvalidRequestError(name, f"must be a finite number, got {v!r}")
    if not ok(v):
        raise InvalidRequestError(name, f"{message}, got {v}")
    setattr(p, name, float(v))


@dataclass
class SamplingState:
    """Per-sequence sampling state, owned by the engine."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: Sequence[int]) -> "SamplingState":
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        return cls(params, list(prompt_token_ids), [], gen)


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None = None


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Repetition (prompt + output, HF: divide positive / multiply negative logits) then frequency and
    presence penalties (output only: logit -= frequency * count + presence * [count > 0]). In place."""
    for i, st in enumerate(states):
        p = st.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(st.prompt_token_ids) | set(st.output_token_ids)), dtype=torch.long)
            if seen.numel():
                row = logits[i, seen]
                logits[i, seen] = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and st.output_token_ids:
            counts = torch.bincount(torch.tensor(st.output_token_ids, dtype=torch.long), minlength=logits.shape[1])
            logits[i] -= p.frequency_penalty * counts.to(logits.dtype) + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k, top-p nucleus and min-p floor of one row [V]."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep a token if the mass strictly before it is < top_p (the top token always stays)
        before = probs.cumsum(-1) - probs
        drop = before >= top_p
        logits = logits.scatter(0, order[drop], float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return logits


class Sampler:
    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampleResult]:
        logits = logits.float()
        want_logprobs = [st.params.logprobs is not None for st in states]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        if any(st.params.repetition_penalty != 1.0 or st.params.frequency_penalty or st.params.presence_penalty
               for st in states):
            logits = apply_penalties(logits.clone(), states)
        greedy = logits.argmax(dim=-1).tolist()
        results = []
        for i, st in enumerate(states):
            p = st.params
            token = greedy[i] if p.is_greedy else self._draw(logits[i], p, st.generator)
            lp = None
            if raw_logprobs is not None and want_logprobs[i]:
                row = raw_logprobs[i]
                lp = {}
                if p.logprobs:
                    top = torch.topk(row, p.logprobs)
                    lp = dict(zip(top.indices.tolist(), top.values.tolist()))
                lp[token] = row[token].item()
            results.append(SampleResult(token, lp))
        return results

    @staticmethod
    def _draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
        row = filter_logits(row / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = row.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator).item())


# ---- stop strings ------------------------------------------------------------------------------------
def stop_string_cut(text: str, stop: Sequence[str], searched_until: int = 0) -> int | None:
    """Where to cut `text` so it ends right before the earliest stop string, or None if none occurs.
    Only text after `searched_until` (minus the longest stop string, which may straddle it) is searched."""
    if not stop:
        return None
    start = max(0, searched_until - max(len(s) for s in stop) + 1)
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def stream_safe_length(text: str, stop: Sequence[str]) -> int:
    """How much of `text` may be streamed now: hold back the last (longest stop - 1) characters, which
    could be the start of a stop string that the next tokens complete."""
    if not stop:
        return len(text)
    return max(0, len(text) - (max(len(s) for s in stop) - 1))
