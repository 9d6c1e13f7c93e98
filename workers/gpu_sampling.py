"""The random draw of a whole batch in a few tensor ops, seeded rows included: no per-sequence Python loop,
no host synchronisation, and the same tokens on any device whatever else shares the batch.

The generator path (sampling._draw) takes one number per seeded row from that request's torch.Generator, one
`.item()` at a time: on a GPU that is a loop of tiny host round trips. Here every row's randomness is a pure
function of (seed, counter, token id), computed on the device that holds the probabilities:

- a counter-based hash (murmur3's 32-bit finaliser, twice) maps each (row key, token id) to 32 random bits,
  which become a uniform u in (0, 1) and an exponential E = -log(u);
- the token is argmax(p_i / E_i) (an exponential race, the Gumbel-max trick in probability space), which
  picks token i with probability exactly p_i / sum(p), and never a token whose probability is 0.

A row's key comes from its seed (64 bits) and its counter (the number of tokens the sequence has sampled),
so a seeded stream continues across steps and preemptions and does not depend on its row or its neighbours.
Unseeded rows get fresh keys from torch's global RNG (so torch.manual_seed still makes a run repeatable).

The hash works on 32-bit values held in int64 tensors and never overflows them: a 32 x 32-bit product is
formed from 16-bit halves. Integer arithmetic is exact on every device, so the uniforms, and the tokens for
the same probabilities, are the same on CUDA and on the CPU.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9          # 2^32 / golden ratio: spreads consecutive counters and token ids apart
SEED_HI_SALT = 0x5BD1E995
SECOND_KEY_SALT = 0x27D4EB2F
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35   # murmur3 fmix32 multipliers


def vectorized_draw_enabled(device: torch.device) -> bool:
    """Whether the sampler draws with `draw` rather than per-request generators: HERD_VECTORIZED_SAMPLING=1/0
    decides; by default on a machine with CUDA, for every step alike. The choice must not depend on the step:
    a graph-replayed decode leaves its logits on the GPU while a prefill or mixed step hands them to the host,
    and a seeded request would otherwise draw by one scheme or the other depending on what shared its batch.
    (`draw` moves host probabilities to the GPU for the hash, which costs tens of milliseconds a step on a CPU
    at a 128k vocabulary; a CPU-only machine keeps the generator draw unless told otherwise.)"""
    value = os.environ.get("HERD_VECTORIZED_SAMPLING", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return device.type == "cuda" or torch.cuda.is_available()


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32), exact in int64: the high half's product only matters mod 2^16."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser: a bijection of 32-bit values whose every output bit depends on every input bit."""
    h = h ^ (h >> 16)
    h = _mul32(h, _M1)
    h = h ^ (h >> 13)
    h = _mul32(h, _M2)
    return h ^ (h >> 16)


def row_keys(seed_lo: torch.Tensor, seed_hi: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """[N, 2] int64 keys (each 32 bits) from 64-bit seeds given as 32-bit halves and per-row counters."""
    k = _fmix32((seed_lo + _fmix32(seed_hi ^ SEED_HI_SALT)) & MASK32)
    k1 = _fmix32((k + _mul32(counters & MASK32, GOLDEN32)) & MASK32)
    return torch.stack([k1, _fmix32(k1 ^ SECOND_KEY_SALT)], dim=-1)


def random_bits(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, vocab] int64 in [0, 2^32): 32 random bits per (row key, token id)."""
    tokens = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    h = _fmix32(_mul32(tokens, GOLDEN32)[None, :] ^ keys[:, :1])
    return _fmix32((h + keys[:, 1:]) & MASK32)


def uniforms(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """[N, vocab] float64 in (0, 1): (bits + 0.5) / 2^32, never 0 or 1."""
    return (random_bits(keys, vocab).double() + 0.5) * 2.0 ** -32


def exponential_race(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row, token i with probability probs[i] / sum(probs): argmax of p_i / E_i with E_i ~ Exp(1)
    from the row's key. probs: [N, V], non-negative (need not sum to 1); keys: [N, 2] from row_keys."""
    exp = -torch.log(uniforms(keys, probs.shape[1]))
    return (probs.double() / exp).argmax(dim=-1)


def draw(probs: torch.Tensor, states: Sequence) -> torch.Tensor:
    """The vectorized counterpart of sampling._draw: one token per row of probs [N, V] for the rows' sampling
    states (SamplingState: a seeded one has a torch.Generator made from its seed, whose initial_seed() is the
    row's seed, n-completion offset included). Counter: the tokens the sequence has sampled so far."""
    n = probs.shape[0]
    seeds = [st.generator.initial_seed() if st.generator is not None else None for st in states]
    unseeded = [j for j, s in enumerate(seeds) if s is None]
    fresh = torch.randint(0, 1 << 32, (len(unseeded), 2)).tolist() if unseeded else []
    halves = [[s & MASK32, s >> 32] if s is not None else None for s in seeds]
    for j, pair in zip(unseeded, fresh):
        halves[j] = pair
    counters = [len(st.output_token_ids) if st.generator is not None else 0 for st in states]
    host = torch.tensor([h + [c] for h, c in zip(halves, counters)], dtype=torch.int64).view(n, 3)
    work = probs
    if probs.device.type == "cpu" and torch.cuda.is_available():
        work = probs.to("cuda")          # the same tokens either way; the hash is cheap only on a GPU
    if work.device.type == "cuda":       # up through pinned memory, without waiting for the queued work
        host = host.pin_memory().to(work.device, non_blocking=True)
    keys = row_keys(host[:, 0], host[:, 1], host[:, 2])
    return exponential_race(work, keys).to(probs.device)
