"""Sampling: request parameters and the batched sampler (stop strings: workers/stop_strings.py).

Order of operations follows vLLM: log-probabilities are taken from the raw model distribution; then
repetition penalty (HF semantics, over prompt + output), frequency/presence penalties (OpenAI semantics,
over output tokens); greedy rows take the argmax; the others apply temperature, top-k, top-p, min-p and
draw. Every stage runs on the whole batch at once and is skipped when no row asks for it, so the common
all-greedy, no-penalty step costs one argmax.

A seeded request draws from its own torch.Generator, consuming exactly one random number per draw, so its
tokens do not depend on what else shares the batch or where its row sits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch

from .errors import InvalidRequestError
from .gpu_sampling import draw as vectorized_draw, vectorized_draw_enabled
from .structured_output import GrammarMatcher, StructuredOutputs, allowed_tokens

MAX_LOGPROBS = 20
MAX_N = 16                  # completions per prompt
MAX_LOGIT_BIAS = 100.0      # OpenAI's range for logit_bias values: [-100, 100]
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range (and the proto's uint64)
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by them overflows float32.
GREEDY_TEMPERATURE = 1e-5
# top-p compares float32 cumulative sums with the threshold; a mass that equals top_p up to rounding counts
# as reaching it, so "top_p that exactly covers the top 2 tokens" keeps exactly those 2.
_TOP_P_ROUNDING = 1e-6
_TOP_P_SLICE = 1024  # tokens ranked per row before falling back to a full sort (see _outside_nucleus)


@dataclass
class SamplingParams:
    max_tokens: int | None = 16          # None: until the context ends (max_model_len - prompt length)
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
    n: int = 1                                       # completions sampled from the prompt (1..MAX_N)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    prompt_logprobs: int | None = None               # top-N log-probabilities of each prompt token
    structured: StructuredOutputs | None = None      # a grammar the output must follow

    def __post_init__(self) -> None:
        # Normalise the list fields first (a single stop string, None, tuples) so validate() sees lists.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = _as_list(self.stop, "stop")
        self.stop_token_ids = _as_list(self.stop_token_ids, "stop_token_ids")
        self.logit_bias = _logit_bias(self.logit_bias)
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
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


# ---- the sampler ---------------------------------------------------------------------------------------
@dataclass
class SamplingState:
    """Per-sequence sampling state, owned by the engine (which appends to output_token_ids after each step).
    It lives as long as the sequence, across preemptions, so a seeded stream continues where it left off."""
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    grammar: GrammarMatcher | None = None  # set by the engine once the request's grammar is compiled

    @classmethod
    def create(cls, params: SamplingParams, prompt_token_ids: Sequence[int], seed_offset: int = 0) -> "SamplingState":
        """`seed_offset` gives each of a request's n completions its own stream (seed + i)."""
        # A CPU generator: the same seed gives the same noise whichever device the logits are on.
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed((params.seed + seed_offset) % (MAX_SEED + 1))
        return cls(params, list(prompt_token_ids), [], gen)


@dataclass
class SampleResult:
    token_id: int
    # {token: logprob} for the top-N of the raw distribution plus the sampled token; None unless asked for.
    logprobs: dict[int, float] | None = None


def _padded(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([list(r) + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """In place on logits [N, V], rows that ask for it only:
    repetition penalty over prompt + output tokens (HF: positive logits / r, negative logits * r), then
    frequency and presence penalties over output tokens (OpenAI: logit -= f * count + p * [count > 0])."""
    n, vocab = logits.shape
    dev = logits.device

    rep = [i for i, st in enumerate(states) if st.params.repetition_penalty != 1.0]
    if rep:
        # Token ids padded with `vocab` scatter into a spare last column that is then dropped.
        ids = _padded([states[i].prompt_token_ids + states[i].output_token_ids for i in rep], vocab, dev)
        seen = torch.zeros(len(rep), vocab + 1, dtype=torch.bool, device=dev).scatter_(1, ids, True)[:, :vocab]
        r = torch.tensor([states[i].params.repetition_penalty for i in rep], dtype=logits.dtype, device=dev)[:, None]
        idx = torch.tensor(rep, device=dev)
        rows = logits[idx]
        penalised = torch.where(rows > 0, rows / r, rows * r)
        logits[idx] = torch.where(seen, penalised, rows)

    additive = [i for i, st in enumerate(states)
                if (st.params.frequency_penalty or st.params.presence_penalty) and st.output_token_ids]
    if additive:
        ids = _padded([states[i].output_token_ids for i in additive], vocab, dev)
        counts = torch.zeros(len(additive), vocab + 1, dtype=logits.dtype, device=dev)
        counts = counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))[:, :vocab]
        f = torch.tensor([states[i].params.frequency_penalty for i in additive], dtype=logits.dtype, device=dev)
        p = torch.tensor([states[i].params.presence_penalty for i in additive], dtype=logits.dtype, device=dev)
        idx = torch.tensor(additive, device=dev)
        logits[idx] -= f[:, None] * counts + p[:, None] * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_masks(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """logits [N, V] with each row's logit_bias added, then every token its grammar does not allow next set
    to -inf (a bias cannot bring back a token the grammar forbids). Returns a new tensor; the grammar rows'
    masks come from one batched call, and rows without a bias or a grammar keep their values.

    Each pass over a [N, 128k] tensor costs milliseconds on a CPU, so there are as few as can be: one to
    unpack the masks, one to select (torch.where writes the result without a separate copy)."""
    dev, vocab = logits.device, logits.shape[1]
    biased = [i for i, st in enumerate(states) if st.params.logit_bias]
    if biased:
        logits = logits.clone()
        for i in biased:
            bias = states[i].params.logit_bias
            ids = torch.tensor(list(bias), dtype=torch.long, device=dev)
            logits[i].index_add_(0, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=dev))
    rows = [i for i, st in enumerate(states) if st.grammar is not None]
    if not rows:
        return logits
    allowed = allowed_tokens([states[i].grammar for i in rows], vocab).to(dev)
    empty = (~allowed.any(-1)).nonzero()[:, 0].tolist()
    if empty:  # the matcher is in an error state: this row cannot go on (Engine._sample fails it alone)
        bad = states[rows[empty[0]]].grammar
        raise RuntimeError(f"grammar allows no next token ({bad.error or 'no continuation'})")
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=dev)
    if len(rows) == len(states):
        return torch.where(allowed, logits, neg_inf)
    out = logits if biased else logits.clone()
    idx = torch.tensor(rows, device=dev)
    out[idx] = torch.where(allowed, logits[idx], neg_inf)
    return out


def filter_logits(logits: torch.Tensor, top_k: Sequence[int] | int, top_p: Sequence[float] | float,
                  min_p: Sequence[float] | float) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k, top-p nucleus and min-p floor, in that order.
    logits is [M, V] (or one row [V]) with per-row parameters (or one value for all). Returns a new tensor.

    top-k keeps ties with the k-th logit (as vLLM/HF do). top-p keeps the smallest set of most likely tokens
    whose mass reaches top_p. min-p drops tokens whose probability is below min_p times the top token's."""
    if logits.dim() == 1:
        return filter_logits(logits[None], top_k, top_p, min_p)[0]
    m, vocab = logits.shape
    dev = logits.device

    def per_row(v):
        return list(v) if isinstance(v, (list, tuple)) else [v] * m

    top_k, top_p, min_p = per_row(top_k), per_row(top_p), per_row(min_p)
    logits = logits.clone()
    neg_inf = float("-inf")

    # k <= 0 (off) or k >= V (clamped) keeps everything, so only rows with 0 < k < V pay for a topk.
    k_rows = [i for i, k in enumerate(top_k) if 0 < k < vocab]
    if k_rows:
        ks = torch.tensor([top_k[i] for i in k_rows], device=dev)[:, None]

        def mask_top_k(rows: torch.Tensor) -> torch.Tensor:
            kth = rows.topk(int(ks.max()), dim=-1).values.gather(1, ks - 1)
            return rows.masked_fill_(rows < kth, neg_inf)
        _on_rows(logits, k_rows, mask_top_k)

    p_rows = [i for i, p in enumerate(top_p) if p < 1.0]
    if p_rows:
        ps = torch.tensor([top_p[i] for i in p_rows], dtype=logits.dtype, device=dev)[:, None]
        _on_rows(logits, p_rows, lambda rows: rows.masked_fill_(_outside_nucleus(rows.softmax(-1), ps), neg_inf))

    mp_rows = [i for i, p in enumerate(min_p) if p > 0.0]
    if mp_rows:
        # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
        floor = torch.tensor([math.log(min_p[i]) for i in mp_rows], dtype=logits.dtype, device=dev)[:, None]
        _on_rows(logits, mp_rows,
                 lambda rows: rows.masked_fill_(rows < rows.max(-1, keepdim=True).values + floor, neg_inf))
    return logits


def _on_rows(logits: torch.Tensor, rows: list[int], fn) -> None:
    """logits[rows] = fn(logits[rows]), in place; when every row takes part, without the gather and scatter
    copies of a [M, V] tensor."""
    if len(rows) == logits.shape[0]:
        fn(logits)
        return
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = fn(logits[idx])


def _outside_nucleus(probs: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Bool mask [M, V] of the tokens outside each row's top-p nucleus: those whose more likely tokens already
    hold top_p of the mass. Sorting a whole 128k vocabulary is the costly part, yet an LLM's nucleus is
    usually a few hundred tokens, so rank only each row's top slice and sort in full only the rows whose slice
    holds less than top_p (a token outside a slice that reaches top_p is outside the nucleus either way)."""
    def drop_sorted(sorted_probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = mass_before >= p - _TOP_P_ROUNDING
        drop[:, 0] = False                              # the most likely token always stays
        return drop

    width = min(probs.shape[1], _TOP_P_SLICE)
    top, order = probs.topk(width, dim=-1)              # sorted, most likely first
    outside = torch.ones_like(probs, dtype=torch.bool).scatter_(1, order, drop_sorted(top, ps))
    short = (top.sum(-1) < ps[:, 0] - _TOP_P_ROUNDING).nonzero()[:, 0]
    if short.numel():
        sorted_probs, order = probs[short].sort(dim=-1, descending=True)
        outside[short] = torch.zeros_like(sorted_probs, dtype=torch.bool).scatter_(
            1, order, drop_sorted(sorted_probs, ps[short]))
    return outside


class Sampler:
    def __call__(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} sequences")
        logits = logits.float()
        lp_rows = [i for i, st in enumerate(states) if st.params.logprobs is not None]
        # Logprobs describe what the model said, so they come from the logits before anything below.
        raw_logprobs = torch.log_softmax(logits[torch.tensor(lp_rows, device=logits.device)], -1) if lp_rows else None
        if any(st.params.has_penalties for st in states):
            logits = apply_penalties(logits.clone(), states)  # clone: the caller's tensor stays untouched
        if any(st.params.logit_bias or st.grammar is not None for st in states):
            logits = apply_logit_masks(logits, states)        # a new tensor, too
        tokens = self._choose(logits, states)
        token_list = tokens.tolist()

        results = [SampleResult(t) for t in token_list]
        if raw_logprobs is not None:
            n_top = min(max(states[i].params.logprobs for i in lp_rows), logits.shape[1])
            top = raw_logprobs.topk(n_top, dim=-1) if n_top else None
            chosen = raw_logprobs.gather(1, tokens[torch.tensor(lp_rows, device=tokens.device)][:, None])[:, 0]
            chosen = chosen.tolist()
            top_ids = top.indices.tolist() if top is not None else None
            top_vals = top.values.tolist() if top is not None else None
            for j, i in enumerate(lp_rows):
                n = states[i].params.logprobs
                entry = dict(zip(top_ids[j][:n], top_vals[j][:n])) if n else {}
                entry.setdefault(token_list[i], chosen[j])
                results[i].logprobs = entry
        return results

    @staticmethod
    def _choose(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """One token id per row: argmax for greedy rows, a draw from the filtered distribution for the rest."""
        tokens = logits.argmax(dim=-1)
        rand = [i for i, st in enumerate(states) if not st.params.is_greedy]
        if not rand:
            return tokens
        dev = logits.device
        idx = torch.tensor(rand, device=dev)
        params = [states[i].params for i in rand]
        rows = logits if len(rand) == len(states) else logits[idx]  # rows below are never written in place
        if any(p.temperature != 1.0 for p in params):
            rows = rows / torch.tensor([p.temperature for p in params], dtype=rows.dtype, device=dev)[:, None]
        if any(0 < p.top_k < rows.shape[1] or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            rows = filter_logits(rows, [p.top_k for p in params], [p.top_p for p in params],
                                 [p.min_p for p in params])
        probs = rows.softmax(-1)
        if vectorized_draw_enabled(probs.device):   # the whole batch in tensor ops (gpu_sampling.py)
            tokens[idx] = vectorized_draw(probs, [states[i] for i in rand])
        else:
            tokens[idx] = _draw(probs, [states[i].generator for i in rand])
        return tokens


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row by inverting the CDF with one uniform number: the first token whose cumulative
    probability exceeds u * total. One number per row keeps the RNG cheap on CPU (an exponential race would
    need a vocabulary's worth per row). Seeded rows take their number from their own generator, unseeded rows
    from the global RNG, so a seeded row's draw depends only on its seed, its history and its own logits."""
    m = probs.shape[0]
    # float64: a float32 running sum over 128k tokens drifts enough to skew the odds of the unlikely tail.
    cdf = probs.double().cumsum(-1)
    u = torch.empty(m, dtype=torch.float64)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), dtype=torch.float64)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand(1, dtype=torch.float64, generator=g, device=g.device).item()
    target = u.to(cdf.device)[:, None] * cdf[:, -1:]
    # right=True: the first index with cdf > target, so a token of probability 0 (a flat step) is never picked.
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
