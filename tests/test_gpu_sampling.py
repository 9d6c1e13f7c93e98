"""workers/gpu_sampling.py: the batch's random draw in tensor ops (counter-based hash -> exponential race).

Run on CPU tensors: the hash is integer arithmetic, exact on any device, so what holds here holds on CUDA."""
from __future__ import annotations

import math
import random

import pytest
import torch

from workers import gpu_sampling as gs
from test_sampling import run_steps
from workers.sampling import Sampler, SamplingParams, SamplingState, apply_penalties, filter_logits


@pytest.fixture
def vectorized(monkeypatch):
    monkeypatch.setenv("HERD_VECTORIZED_SAMPLING", "1")


def _fmix32_reference(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_32_bit_arithmetic_in_int64_is_exact():
    rng = random.Random(0)
    xs = [0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF] + [rng.getrandbits(32) for _ in range(2000)]
    t = torch.tensor(xs, dtype=torch.int64)
    for c in (gs.GOLDEN32, 0x85EBCA6B, 0xC2B2AE35, 3):
        assert gs._mul32(t, c).tolist() == [(x * c) & 0xFFFFFFFF for x in xs]
    assert gs._fmix32(t).tolist() == [_fmix32_reference(x) for x in xs]
    assert int(gs._fmix32(t).min()) >= 0 and int(gs._fmix32(t).max()) <= 0xFFFFFFFF


def keys(seeds, counters):
    return gs.row_keys(torch.tensor([s & 0xFFFFFFFF for s in seeds]), torch.tensor([s >> 32 for s in seeds]),
                       torch.tensor(counters))


def test_uniforms_look_uniform_and_independent():
    u = gs.uniforms(keys(range(64), [0] * 64), 4096)           # 262k numbers
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.003
    assert abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u.float(), bins=32, min=0, max=1) / u.numel()
    assert float((hist - 1 / 32).abs().max()) < 0.002
    centred = u - 0.5
    next_token = (centred[:, 1:] * centred[:, :-1]).mean() * 12       # correlation of neighbours in a row
    next_row = (centred[1:] * centred[:-1]).mean() * 12                # ... and of neighbouring rows
    assert abs(float(next_token)) < 0.01 and abs(float(next_row)) < 0.01


def test_streams_depend_on_seed_counter_and_all_64_seed_bits():
    base = gs.random_bits(keys([5], [0]), 256)
    for other in (keys([6], [0]), keys([5], [1]), keys([5 + (1 << 32)], [0]), keys([5 + (1 << 63)], [0])):
        bits = gs.random_bits(other, 256)
        assert (bits == base).float().mean() < 0.02
    assert torch.equal(gs.random_bits(keys([5], [0]), 256), base)


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 300, generator=g)
    k = keys([11, 12, 13, 14, 15, 16], [0, 3, 9, 1, 0, 7])
    together = gs.exponential_race(probs, k)
    alone = torch.cat([gs.exponential_race(probs[i:i + 1], k[i:i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.equal(gs.exponential_race(probs[perm], k[perm]), together[perm])


def test_the_race_draws_each_token_with_its_probability():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0])
    n = 40_000
    tokens = gs.exponential_race(probs.expand(n, -1), keys(range(n), [0] * n))
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert freq[5] == 0                                              # probability 0: never
    expected = probs.double()
    chi2 = float((((freq - expected) ** 2 / expected.clamp_min(1e-12))[:5]).sum() * n)
    assert chi2 < 23.5      # chi-square, 4 degrees of freedom: p = 1e-4


def states(params_list, prompt=(1, 2, 3)):
    return [SamplingState.create(p, list(prompt)) for p in params_list]


def test_sampler_seeded_rows_are_reproducible_whatever_the_batch(vectorized):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=7)
    alone = run_steps(Sampler(), logits[[0]], states([seeded]), 30)
    batch = [SamplingParams(temperature=0.7), SamplingParams(temperature=0), seeded,
             SamplingParams(temperature=1.3, seed=3, top_k=5)]
    assert run_steps(Sampler(), logits[[1, 2, 0, 3]], states(batch), 30, row=2) == alone
    assert run_steps(Sampler(), logits[[0]], states([SamplingParams(temperature=1.0, seed=8)]), 30) != alone
    assert len(set(alone)) > 1
    # n completions: completion i draws what a request seeded with seed + i draws
    p = SamplingParams(temperature=1.0, seed=11, n=3)
    third = run_steps(Sampler(), logits[[0]], [SamplingState.create(p, [1, 2, 3], seed_offset=2)], 20)
    assert third == run_steps(Sampler(), logits[[0]], states([SamplingParams(temperature=1.0, seed=13)]), 20)


def test_sampler_unseeded_rows_follow_torch_manual_seed(vectorized):
    logits = torch.zeros(2, 1000)
    torch.manual_seed(123)
    a = run_steps(Sampler(), logits, states([SamplingParams(), SamplingParams()]), 5)
    torch.manual_seed(123)
    assert run_steps(Sampler(), logits, states([SamplingParams(), SamplingParams()]), 5) == a


def test_sampler_never_draws_a_filtered_token(vectorized):
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 0.0, -math.inf]])
    assert set(run_steps(Sampler(), logits, states([SamplingParams(seed=0)]), 300)) == {1, 3}


@pytest.mark.parametrize("params", [
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=6),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.9, min_p=0.05),
    dict(temperature=1.0, top_k=10, top_p=0.9, min_p=0.02, repetition_penalty=1.3, frequency_penalty=0.5,
         presence_penalty=0.4),
])
def test_batch_distribution_matches_the_filtered_softmax(params, monkeypatch):
    """Many rows of one distribution, each with its own seed, drawn in one call: the empirical distribution is
    within sampling error of the softmax after penalties, temperature and the filters, for the vectorized
    draw and for the generator draw alike."""
    vocab, n = 24, 20_000
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(4)) * 2
    prompt, output = [0, 1, 2, 2], [3, 3, 5]

    def make_states():
        sts = [SamplingState.create(SamplingParams(seed=i, **params), prompt) for i in range(n)]
        for st in sts:
            st.output_token_ids = list(output)
        return sts

    ref_state = make_states()[:1]
    expected_logits = apply_penalties(logits.clone(), ref_state) / params["temperature"]
    p = SamplingParams(**params)
    expected = filter_logits(expected_logits, p.top_k, p.top_p, p.min_p).softmax(-1)[0].double()
    for mode in ("1", "0"):
        monkeypatch.setenv("HERD_VECTORIZED_SAMPLING", mode)
        tokens = torch.tensor([r.token_id for r in Sampler()(logits.expand(n, -1), make_states())])
        freq = torch.bincount(tokens, minlength=vocab).double() / n
        assert float(freq[expected == 0].sum()) == 0, mode            # nothing outside the support
        support = expected > 0
        chi2 = float(((freq - expected)[support] ** 2 / expected[support]).sum() * n)
        df = int(support.sum()) - 1
        # Wilson-Hilferty: the chi-square quantile at p = 1e-4 for df degrees of freedom
        z = 3.719
        limit = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3 if df > 0 else 0.0
        assert chi2 <= limit, (mode, chi2, limit)


def test_selection_follows_the_switch(monkeypatch):
    monkeypatch.setenv("HERD_VECTORIZED_SAMPLING", "0")
    assert not gs.vectorized_draw_enabled(torch.device("cuda"))
    monkeypatch.setenv("HERD_VECTORIZED_SAMPLING", "1")
    assert gs.vectorized_draw_enabled(torch.device("cpu"))
    monkeypatch.delenv("HERD_VECTORIZED_SAMPLING")
    assert gs.vectorized_draw_enabled(torch.device("cuda"))
    assert gs.vectorized_draw_enabled(torch.device("cpu")) == torch.cuda.is_available()   # per machine, not step
