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
from dataclasses import dataclass
from typing import Sequence

import torch

from .gpu_sampling import draw as vectorized_draw, vectorized_draw_enabled
# SamplingParams and its bounds live in the light workers/sampling_params.py (the client and the CLI read its
# fields); re-exported here, beside the sampler that applies them.
from .sampling_params import (GREEDY_TEMPERATURE, MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N,  # noqa: F401
                              MAX_SEED, SamplingParams)
from .seen_tokens import SeenTokens
from .structured_output import GrammarMatcher, allowed_tokens

# top-p compares float32 cumulative sums with the threshold; a mass that equals top_p up to rounding counts
# as reaching it, so "top_p that exactly covers the top 2 tokens" keeps exactly those 2.
_TOP_P_ROUNDING = 1e-6
_TOP_P_SLICE = 1024  # tokens ranked per row before falling back to a full sort (see _outside_nucleus)


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
    # logit_bias as (ids, values) tensors, built at the first step that needs them: rebuilding them from the
    # dict every step cost ~22 ms a step for a 128k-entry bias, paid by the whole batch.
    _bias: tuple[torch.Tensor, torch.Tensor] | None = None
    _seen: SeenTokens | None = None

    def seen_tokens(self) -> SeenTokens:
        """The distinct tokens of prompt and output with their output counts, up to date (the penalties')."""
        if self._seen is None:
            self._seen = SeenTokens(self.prompt_token_ids)
        return self._seen.update(self.output_token_ids)

    def bias_tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._bias is None or self._bias[1].device != device or self._bias[1].dtype != dtype:
            bias = self.params.logit_bias
            self._bias = (torch.tensor(list(bias), dtype=torch.long, device=device),
                          torch.tensor(list(bias.values()), dtype=dtype, device=device))
        return self._bias

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


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """In place on logits [N, V], rows that ask for it only:
    repetition penalty over prompt + output tokens (HF: positive logits / r, negative logits * r), then
    frequency and presence penalties over output tokens (OpenAI: logit -= f * count + p * [count > 0]).

    Only the logits of tokens a row has seen are read and written, from each sequence's SeenTokens: over the
    whole vocabulary (a [rows, 128k] mask and counts) 32 penalised rows cost 45 ms a step on a CPU."""
    dev = logits.device
    rep = [i for i, st in enumerate(states)
           if st.params.repetition_penalty != 1.0 and (st.prompt_token_ids or st.output_token_ids)]
    additive = [i for i, st in enumerate(states)
                if (st.params.frequency_penalty or st.params.presence_penalty) and st.output_token_ids]
    penalised = sorted(set(rep) | set(additive))
    if not penalised:
        return logits
    # The seen tokens of every penalised row, gathered once for both kinds of penalty.
    all_rows = torch.tensor(penalised, device=dev)[:, None]
    all_ids, all_counts = _seen([states[i] for i in penalised], dev)

    def of(wanted: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if len(wanted) == len(penalised):
            return all_rows, all_ids, all_counts
        keep = set(wanted)
        pick = torch.tensor([k for k, i in enumerate(penalised) if i in keep], device=dev)
        return all_rows[pick], all_ids[pick], all_counts[pick]

    if rep:
        rows, ids, _ = of(rep)
        r = torch.tensor([states[i].params.repetition_penalty for i in rep], dtype=logits.dtype, device=dev)[:, None]
        seen = logits[rows, ids]
        # A row's padding repeats its first token, which is then written twice with the same value.
        logits[rows, ids] = torch.where(seen > 0, seen / r, seen * r)
    if additive:
        rows, ids, counts = of(additive)
        counts = counts.to(logits.dtype)
        f = torch.tensor([states[i].params.frequency_penalty for i in additive], dtype=logits.dtype, device=dev)
        p = torch.tensor([states[i].params.presence_penalty for i in additive], dtype=logits.dtype, device=dev)
        delta = f[:, None] * counts + p[:, None] * (counts > 0).to(logits.dtype)
        # Added, not assigned: a padding entry (the row's first token again) adds 0 beside the real one.
        logits.index_put_((rows.expand_as(ids), ids), -delta, accumulate=True)
    return logits


def _seen(states: Sequence[SamplingState], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] the distinct tokens each state has seen and their output counts; a short row is padded
    with its own first token and a count of 0."""
    seen = [st.seen_tokens() for st in states]
    ids = torch.nn.utils.rnn.pad_sequence([s.ids for s in seen], batch_first=True, padding_value=-1)
    counts = torch.nn.utils.rnn.pad_sequence([s.output_counts for s in seen], batch_first=True, padding_value=0)
    ids = torch.where(ids < 0, ids[:, :1], ids)
    return ids.to(device), counts.to(device)


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
            logits[i].index_add_(0, *states[i].bias_tensors(dev, logits.dtype))
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
        tokens = greedy_tokens(logits)
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


# Row blocks of the CPU argmax below: the vocabulary is scanned once by a vectorized max per block.
ARGMAX_BLOCK = 256


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), the same index (the first of equal maxima; a NaN counts as the maximum). On the CPU
    torch's argmax over a large vocabulary runs an element at a time: 14 ms for 64 rows of Llama 3's 128,256
    logits on one core, 37% of a decode step of the demo 1B model (py-spy), while a max over the same values
    is vectorized. So the row's maximum is found per block of ARGMAX_BLOCK values (the vectorized max), the
    first block holding the row's maximum by argmax over the block maxima, and the index within that block by
    argmax over its ARGMAX_BLOCK values: 1.7 ms. Elsewhere (CUDA) torch's argmax is one fast kernel."""
    n, vocab = logits.shape
    if logits.device.type != "cpu" or vocab < 8 * ARGMAX_BLOCK:
        return logits.argmax(dim=-1)
    full = vocab // ARGMAX_BLOCK
    block_max = logits[:, :full * ARGMAX_BLOCK].reshape(n, full, ARGMAX_BLOCK).amax(-1)
    if full * ARGMAX_BLOCK < vocab:  # the last, shorter block
        block_max = torch.cat([block_max, logits[:, full * ARGMAX_BLOCK:].amax(-1, keepdim=True)], 1)
    start = block_max.argmax(-1) * ARGMAX_BLOCK
    # The last block's window runs past the vocabulary: clamped, it repeats the last logit after it, which
    # argmax (first of equals) never prefers to the real one.
    window = (start[:, None] + torch.arange(ARGMAX_BLOCK, device=logits.device)).clamp_(max=vocab - 1)
    return start + torch.gather(logits, 1, window).argmax(-1)


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
