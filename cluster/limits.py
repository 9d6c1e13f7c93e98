"""Input limits at the edge: what one request may ask for, checked before anything is tokenized or queued.

Each bound is a `limits:` key of the cluster config (cluster.config.LimitsConfig) and each violation is an
`ApiError` INVALID_ARGUMENT (HTTP 400) naming the field, so a client learns exactly what to change. They exist
so that nothing one request sends costs the others more than its own tokens: a thousand stop strings, a
million chat messages or a 100 MB prompt are refused here, in microseconds, not discovered by the engine.

Request ids a client chooses are echoed back and logged, so they are bounded too (length and charset), and a
duplicate of a request still in flight on this ingress replica is ALREADY_EXISTS rather than two streams
mixed under one name.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from cluster.config import LimitsConfig
from cluster.errors import ApiError

REQUEST_ID_CHARSET = re.compile(r"^[A-Za-z0-9._:\-]+$")


class InputLimits:
    def __init__(self, limits: LimitsConfig | Mapping[str, Any] | None = None):
        if limits is None:
            limits = LimitsConfig()
        elif not isinstance(limits, LimitsConfig):
            limits = LimitsConfig.model_validate(dict(limits))
        self.cfg = limits

    # ---- text sizes (before tokenizing) ----------------------------------------------------------------
    def check_prompt_text(self, text: str, field: str) -> None:
        _at_most(field, len(text), self.cfg.max_prompt_chars, "characters", "max_prompt_chars")

    def check_tokenize_text(self, text: str, field: str = "text") -> None:
        _at_most(field, len(text), self.cfg.max_tokenize_chars, "characters", "max_tokenize_chars")

    def check_messages(self, messages: list[dict[str, str]], field: str = "messages") -> int:
        """Bound the message count and their content's size; returns that size (characters)."""
        _at_most(field, len(messages), self.cfg.max_chat_messages, "messages", "max_chat_messages")
        total = sum(len(m.get("content") or "") for m in messages)
        _at_most(field, total, self.cfg.max_prompt_chars, "characters of content", "max_prompt_chars")
        return total

    def check_prompt_count(self, n: int, field: str = "prompt") -> None:
        _at_most(field, n, self.cfg.max_prompts_per_request, "prompts", "max_prompts_per_request")

    # ---- after tokenizing -------------------------------------------------------------------------------
    def check_prompt_tokens(self, n: int, field: str) -> None:
        if self.cfg.max_prompt_tokens is not None:
            _at_most(field, n, self.cfg.max_prompt_tokens, "tokens", "max_prompt_tokens")

    # ---- sampling -----------------------------------------------------------------------------------------
    def check_sampling(self, sampling: Mapping[str, Any]) -> None:
        """Bounds on a sampling dict (already shaped like workers.SamplingParams' fields)."""
        stop = sampling.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        _at_most("stop", len(stop), self.cfg.max_stop_strings, "stop strings", "max_stop_strings")
        for s in stop:
            if isinstance(s, str):
                _at_most("stop", len(s), self.cfg.max_stop_string_chars, "characters in a stop string",
                         "max_stop_string_chars")
        ids = sampling.get("stop_token_ids") or []
        _at_most("stop_token_ids", len(ids), self.cfg.max_stop_token_ids, "ids", "max_stop_token_ids")
        bias = sampling.get("logit_bias") or {}
        if hasattr(bias, "__len__"):   # (a wrong type is SamplingParams' to name)
            _at_most("logit_bias", len(bias), self.cfg.max_logit_bias_tokens, "token ids", "max_logit_bias_tokens")
        logprobs = sampling.get("logprobs")
        if isinstance(logprobs, int) and not isinstance(logprobs, bool):
            _at_most("logprobs", logprobs, self.cfg.max_logprobs, "top log-probabilities", "max_logprobs")
        rp = sampling.get("repetition_penalty")
        if isinstance(rp, (int, float)) and not isinstance(rp, bool):
            lo, hi = self.cfg.min_repetition_penalty, self.cfg.max_repetition_penalty
            if not lo <= rp <= hi:
                raise ApiError.invalid("repetition_penalty", f"must be in [{lo:g}, {hi:g}], got {rp:g}")

    # ---- structured outputs and tools (their checks cost time per character: bounded first) -------------
    def check_structured_chars(self, chars: int, field: str = "structured") -> None:
        _at_most(field, chars, self.cfg.max_structured_chars, "characters of constraint", "max_structured_chars")

    def check_tools_chars(self, chars: int, field: str = "tools") -> None:
        _at_most(field, chars, self.cfg.max_tools_chars, "characters of tool definitions", "max_tools_chars")

    # ---- request ids ---------------------------------------------------------------------------------------
    def check_request_id(self, request_id: str, field: str = "request_id") -> None:
        _at_most(field, len(request_id), self.cfg.max_request_id_chars, "characters", "max_request_id_chars")
        if not REQUEST_ID_CHARSET.match(request_id):
            raise ApiError.invalid(field, "may hold only letters, digits and . _ : -")


class LiveRequestIds:
    """Client-chosen request ids in flight on this ingress replica (a context manager per request)."""

    def __init__(self) -> None:
        self._live: set[str] = set()

    def hold(self, request_id: str) -> "_Held":
        if request_id in self._live:
            raise ApiError("ALREADY_EXISTS", f"request_id {request_id!r} is already in flight", "request_id")
        self._live.add(request_id)
        return _Held(self._live, request_id)

    def __len__(self) -> int:
        return len(self._live)


class _Held:
    def __init__(self, live: set[str], request_id: str):
        self._live, self._id = live, request_id

    def __enter__(self) -> str:
        return self._id

    def __exit__(self, *exc: Iterable[Any]) -> None:
        self._live.discard(self._id)


def _at_most(field: str, value: int, limit: int, unit: str, key: str) -> None:
    if value > limit:
        raise ApiError.invalid(field, f"{value} {unit} is over this server's limit of {limit} (limits.{key})")
