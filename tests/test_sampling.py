"""SamplingParams validation, the batched sampler, penalties and logprobs (stop strings: test_stop_strings.py)."""
from __future__ import annotations

import math

import pytest
import torch

from workers import SamplingParams as PublicSamplingParams
from workers.errors import InvalidRequestError
from workers.sampling import (ARGMAX_BLOCK, Sampler, SamplingParams, SamplingState, apply_penalties, filter_logits,
                              greedy_tokens)


# ---- SamplingParams ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": "8"}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"temperature": math.inf}, "temperature"), ({"temperature": "0.5"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"seed": -3}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.0}, "seed"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"presence_penalty": math.nan}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"logprobs": True}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"stop": ""}, "stop"), ({"stop": [3]}, "stop"), ({"stop": 3}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": ["7"]}, "stop_token_ids"), ({"stop_token_ids": 7}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"ignore_eos": 1}, "ignore_eos"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_defaults_and_accepted_edges():
    p = PublicSamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.seed, p.stop, p.stop_token_ids,
            p.ignore_eos, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.logprobs) == \
        (16, 1.0, 1.0, -1, 0.0, None, [], [], False, 0.0, 0.0, 1.0, None)
    for ok in ({"top_k": 0}, {"top_k": -1}, {"top_k": 10**6}, {"top_p": 1}, {"min_p": 1}, {"seed": 0},
               {"seed": 2**64 - 1}, {"logprobs": 0}, {"logprobs": 20}, {"presence_penalty": -2},
               {"stop": None}, {"stop": ("a", "b")}, {"stop_token_ids": (1, 2)}):
        SamplingParams(**ok)
    assert SamplingParams(stop=("a",), stop_token_ids=(2,)).stop == ["a"]
    assert isinstance(SamplingParams(temperature=0).temperature, float)


def test_is_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-7).is_greedy      # would overflow float32 if divided by
    assert not SamplingParams(temperature=0.5).is_greedy


def test_from_dict_rejects_unknown_keys_and_accepts_a_single_stop_string():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({"max_tokens": 4, "temprature": 0.5})
    assert e.value.field == "temprature"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict(["max_tokens"])
    assert e.value.field == "sampling"
    assert SamplingParams.from_dict({"stop": "END"}).stop == ["END"]
    p = SamplingParams(temperature=0.3, top_k=5, stop=["x"], seed=9)
    assert SamplingParams.from_dict(p.to_dict()) == p


# ---- helpers ---------------------------------------------------------------------------------------------
def states(params_list, prompt=(1, 2, 3)):
    return [SamplingState.create(p, list(prompt)) for p in params_list]


def run_steps(sampler, logits, sts, steps, row=0):
    """Sample `steps` times from fixed logits, appending to every state as the engine does; row's tokens."""
    out = []
    for _ in range(steps):
        res = sampler(logits, sts)
        for st, r in zip(sts, res):
            st.output_token_ids.append(r.token_id)
        out.append(res[row].token_id)
    return out


# ---- seeded sampling -------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_whatever_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    sampler = Sampler()
    seeded = SamplingParams(temperature=1.0, seed=7)

    alone = run_steps(sampler, logits[[0]], states([seeded]), 30)
    # same row, now third in a batch with an unseeded row, a greedy row and another seeded row
    batch = [SamplingParams(temperature=0.7), SamplingParams(temperature=0), seeded,
             SamplingParams(temperature=1.3, seed=3, top_k=5)]
    in_batch = run_steps(sampler, logits[[1, 2, 0, 3]], states(batch), 30, row=2)
    assert alone == in_batch
    assert run_steps(sampler, logits[[0]], states([SamplingParams(temperature=1.0, seed=8)]), 30) != alone
    assert len(set(alone)) > 1  # it really samples


def test_unseeded_rows_use_the_global_rng():
    logits = torch.zeros(1, 1000)
    torch.manual_seed(123)
    a = run_steps(Sampler(), logits, states([SamplingParams()]), 5)
    torch.manual_seed(123)
    b = run_steps(Sampler(), logits, states([SamplingParams()]), 5)
    assert a == b


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    st = states([SamplingParams(seed=1)])
    n = 8000
    counts = torch.bincount(torch.tensor(run_steps(Sampler(), logits, st, n)), minlength=4).float() / n
    assert torch.allclose(counts, probs, atol=0.02)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    n = 3000

    def freq_of_top(t):
        toks = run_steps(Sampler(), logits, states([SamplingParams(temperature=t, seed=5)]), n)
        return toks.count(0) / n

    expect = lambda t: torch.softmax(logits[0] / t, -1)[0].item()  # noqa: E731
    for t in (0.5, 1.0, 2.0):
        assert freq_of_top(t) == pytest.approx(expect(t), abs=0.03)


# ---- filters ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {9, 8}),
    (SamplingParams(top_k=1, temperature=5.0), {9}),
    (SamplingParams(top_p=0.5), {9}),                     # the top token alone holds > 50% of the mass
    (SamplingParams(top_p=0.7), {9, 8}),                  # 0.60 < 0.7 <= 0.60 + 0.22
    (SamplingParams(min_p=0.3), {9, 8}),                  # p8 / p9 = e^-1 ≈ 0.37 >= 0.3; others e^-3
    (SamplingParams(min_p=0.4), {9}),
    (SamplingParams(top_k=3, top_p=0.7), {9, 8}),
    (SamplingParams(top_k=1000), set(range(10))),        # k > V is clamped
    (SamplingParams(top_k=0), set(range(10))),
])
def test_filters_restrict_the_support(params, allowed):
    torch.manual_seed(0)                                  # unseeded rows use the global RNG
    logits = torch.tensor([[0.0] * 8 + [2.0, 3.0]])       # token 9 ≈ 0.60, token 8 ≈ 0.22 of the mass
    seen = set(run_steps(Sampler(), logits, states([params]), 600))
    assert seen == allowed


@pytest.mark.parametrize("top_p, kept", [
    (0.5, [True, False, False]),    # the top token's mass equals top_p exactly: it alone suffices
    (0.8, [True, True, False]),     # exactly the top 2
    (0.81, [True, True, True]),
    (1e-9, [True, False, False]),   # the top token always stays
    (1.0, [True, True, True]),
])
def test_top_p_boundaries(top_p, kept):
    row = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    assert torch.isfinite(filter_logits(row, top_k=-1, top_p=top_p, min_p=0.0)).tolist() == kept


def test_top_k_boundaries_and_min_p_exact():
    row = torch.tensor([1.0, 4.0, 3.0, 2.0])
    assert torch.isfinite(filter_logits(row, 2, 1.0, 0.0)).tolist() == [False, True, True, False]
    assert torch.isfinite(filter_logits(row, 4, 1.0, 0.0)).all()
    assert torch.isfinite(filter_logits(row, 5, 1.0, 0.0)).all()
    # min_p keeps p_i >= min_p * p_max, i.e. logit_i >= logit_max + log(min_p)
    kept = torch.isfinite(filter_logits(row, -1, 1.0, math.exp(-2.0) * 0.999)).tolist()
    assert kept == [False, True, True, True]
    assert torch.isfinite(filter_logits(row, -1, 1.0, 1.0)).tolist() == [False, True, False, False]


def test_batched_filters_equal_row_by_row():
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    ks, ps, mps = [3, -1, 0, 100], [1.0, 0.9, 0.5, 0.95], [0.0, 0.05, 0.0, 0.1]
    batched = filter_logits(logits, ks, ps, mps)
    for i in range(4):
        assert torch.equal(batched[i], filter_logits(logits[i], ks[i], ps[i], mps[i]))
    assert torch.isfinite(batched[0]).sum() == 3


def test_top_p_on_a_large_vocabulary_equals_a_full_sort():
    # The nucleus is found in each row's top 1024 tokens when they hold top_p of the mass, else by a full sort;
    # both must give what a plain full sort gives. Row 0 is peaked (slice path), row 1 flat (fallback).
    g = torch.Generator().manual_seed(3)
    logits = torch.stack([torch.randn(5000, generator=g) * 6, torch.randn(5000, generator=g) * 0.1])
    for top_p in (0.3, 0.9, 0.99):
        got = torch.isfinite(filter_logits(logits, -1, top_p, 0.0))
        probs = logits.softmax(-1)
        sorted_probs, order = probs.sort(-1, descending=True)
        keep_sorted = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        expected = torch.zeros_like(keep_sorted).scatter_(1, order, keep_sorted)
        assert torch.equal(got, expected)
        assert got[0].sum() < 1024 < got[1].sum()


def test_tokens_of_zero_probability_are_never_drawn():
    logits = torch.tensor([[-math.inf, 0.0, -math.inf, 0.0, -math.inf]])
    assert set(run_steps(Sampler(), logits, states([SamplingParams(seed=0)]), 500)) == {1, 3}


def test_logits_must_match_the_states():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 4), states([SamplingParams()]))


# ---- penalties -------------------------------------------------------------------------------------------
def test_penalties_match_the_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, 0.0, -3.0],
                           [2.0, -1.0, 0.5, 1.0, 0.0, -3.0]])
    st = SamplingState.create(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
                              prompt_token_ids=[0, 4])
    st.output_token_ids += [1, 1, 2]
    plain = SamplingState.create(SamplingParams(), prompt_token_ids=[0, 1])
    plain.output_token_ids += [1]
    out = apply_penalties(logits.clone(), [st, plain])
    # repetition over prompt+output {0, 1, 2, 4}: 2/2=1, -1*2=-2, 0.5/2=0.25, 0 stays 0; 3 and 5 untouched;
    # then output counts {1: 2, 2: 1}: -= 0.5*count + 0.25
    expected = torch.tensor([1.0, -2.0 - 0.5 * 2 - 0.25, 0.25 - 0.5 * 1 - 0.25, 1.0, 0.0, -3.0])
    assert torch.allclose(out[0], expected)
    assert torch.equal(out[1], logits[1])  # a row without penalties is untouched


def _dense_penalties(logits: torch.Tensor, states) -> torch.Tensor:
    """The definition over the whole vocabulary, row by row: the reference for apply_penalties."""
    out = logits.clone()
    vocab = logits.shape[1]
    for i, st in enumerate(states):
        p = st.params
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool)
            seen[st.prompt_token_ids + st.output_token_ids] = True
            row = out[i]
            out[i] = torch.where(seen, torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty),
                                 row)
        if p.frequency_penalty or p.presence_penalty:
            counts = torch.bincount(torch.tensor(st.output_token_ids, dtype=torch.long), minlength=vocab)
            counts = counts.to(logits.dtype)
            out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return out


def test_penalties_touch_only_seen_tokens_and_equal_the_dense_definition():
    """Random batches: rows with and without each penalty, empty and repeated outputs, prompts of 0 to 300
    tokens: apply_penalties (which reads and writes only the tokens a row has seen) equals the dense
    definition bit for bit."""
    import random

    rng = random.Random(5)
    vocab = 500
    for _ in range(20):
        states_, n = [], rng.randint(1, 12)
        for _ in range(n):
            params = SamplingParams(repetition_penalty=rng.choice([1.0, 0.7, 1.3]),
                                    frequency_penalty=rng.choice([0.0, 0.5, -1.25]),
                                    presence_penalty=rng.choice([0.0, 0.25, -2.0]))
            st = SamplingState.create(params, [rng.randrange(vocab) for _ in range(rng.randint(0, 300))])
            st.output_token_ids += [rng.randrange(40) for _ in range(rng.randint(0, 60))]   # repeats
            states_.append(st)
        for _ in range(3):   # the sequences' SeenTokens, kept from step to step, follow their outputs
            logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(rng.randrange(1000)))
            assert torch.equal(apply_penalties(logits.clone(), states_), _dense_penalties(logits, states_))
            for st in states_:
                st.output_token_ids += [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]


def test_seen_tokens_follow_a_growing_output():
    """Distinct tokens of prompt and output, with output counts, updated from the new tokens only."""
    import random
    from collections import Counter

    from workers.seen_tokens import SeenTokens

    rng = random.Random(3)
    prompt = [rng.randrange(50) for _ in range(30)]
    output: list[int] = []
    seen = SeenTokens(prompt)
    for _ in range(40):   # grows past its first capacity several times
        output += [rng.randrange(3000) for _ in range(rng.randint(0, 25))]
        seen.update(output)
        counts = Counter(output)
        assert sorted(seen.ids.tolist()) == sorted(set(prompt) | set(output))
        assert dict(zip(seen.ids.tolist(), seen.output_counts.tolist())) == {t: counts.get(t, 0)
                                                                              for t in set(prompt) | set(output)}


def test_frequency_and_presence_count_output_tokens_only():
    logits = torch.zeros(1, 4)
    st = SamplingState.create(SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5), prompt_token_ids=[3, 3])
    assert torch.equal(apply_penalties(logits.clone(), [st]), logits)   # nothing generated yet
    st.output_token_ids += [2, 2, 2, 0]
    out = apply_penalties(logits.clone(), [st])
    assert out[0].tolist() == pytest.approx([-1.0 + 0.5, 0.0, -3.0 + 0.5, 0.0])


def test_repetition_penalty_below_one_encourages():
    st = SamplingState.create(SamplingParams(repetition_penalty=0.5), prompt_token_ids=[0, 1])
    out = apply_penalties(torch.tensor([[1.0, -1.0, 1.0]]), [st])
    assert out[0].tolist() == pytest.approx([2.0, -0.5, 1.0])


def test_greedy_is_argmax_and_penalised_greedy_changes_choice():
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    original = logits.clone()
    assert Sampler()(logits, states([SamplingParams(temperature=0)]))[0].token_id == 1
    st = SamplingState.create(SamplingParams(temperature=0, presence_penalty=1.0), [0])
    st.output_token_ids.append(1)
    assert Sampler()(logits, [st])[0].token_id == 2
    st = SamplingState.create(SamplingParams(temperature=0, repetition_penalty=1.2), [1])
    assert Sampler()(logits, [st])[0].token_id == 2     # 3 / 1.2 = 2.5 < 2.9
    assert torch.equal(logits, original)                 # the caller's logits are not modified


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=0), SamplingParams(top_k=3), SamplingParams(temperature=0),
              SamplingParams(top_p=0.5, seed=1), SamplingParams(temperature=0, top_k=2), SamplingParams(min_p=0.2)]
    res = Sampler()(logits, states(params))
    for i in (0, 2, 4):
        assert res[i].token_id == int(logits[i].argmax())


# ---- logprobs --------------------------------------------------------------------------------------------
def test_logprobs_are_raw_top_n_plus_the_sampled_token():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    raw = torch.log_softmax(logits[0], -1)
    # repetition penalty on token 1 makes greedy pick token 2; logprobs still describe the raw distribution
    st = SamplingState.create(SamplingParams(temperature=0, logprobs=2, repetition_penalty=4.0), [1])
    res = Sampler()(logits, [st])[0]
    assert res.token_id == 2
    assert list(res.logprobs) == [1, 2]
    for tok, lp in res.logprobs.items():
        assert lp == pytest.approx(raw[tok].item(), abs=1e-6)

    # the sampled token outside the top-N is added; logprobs=0 gives the sampled token alone
    st = SamplingState.create(SamplingParams(temperature=0, logprobs=1, repetition_penalty=4.0), [1])
    res = Sampler()(logits, [st])[0]
    assert res.logprobs == pytest.approx({1: raw[1].item(), 2: raw[2].item()})
    st = SamplingState.create(SamplingParams(temperature=0, logprobs=0), [0])
    assert Sampler()(logits, [st])[0].logprobs == pytest.approx({1: raw[1].item()})


def test_logprobs_per_row_in_a_batch():
    logits = torch.randn(3, 30, generator=torch.Generator().manual_seed(6))
    raw = torch.log_softmax(logits, -1)
    params = [SamplingParams(logprobs=5, seed=1), SamplingParams(), SamplingParams(logprobs=20, temperature=0)]
    res = Sampler()(logits, states(params))
    assert res[1].logprobs is None
    for i, n in ((0, 5), (2, 20)):
        top = raw[i].topk(n)
        expected = dict(zip(top.indices.tolist(), top.values.tolist()))
        expected.setdefault(res[i].token_id, raw[i, res[i].token_id].item())
        assert res[i].logprobs == pytest.approx(expected)
    tiny = torch.randn(1, 5)                              # N larger than the vocabulary is clamped
    assert len(Sampler()(tiny, states([SamplingParams(logprobs=20)]))[0].logprobs) == 5


# ---- n, logit_bias, prompt_logprobs, structured, max_tokens=None ---------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"), ({"n": 17}, "n"), ({"n": 2.0}, "n"), ({"n": True}, "n"),
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {1: -100.5}}, "logit_bias"),
    ({"logit_bias": {1: math.nan}}, "logit_bias"), ({"logit_bias": {1: "5"}}, "logit_bias"),
    ({"logit_bias": {True: 1}}, "logit_bias"), ({"logit_bias": [1, 2]}, "logit_bias"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"structured": {"regex": "a", "json_object": True}}, "structured"),
    ({"structured": {"choice": "abc"}}, "structured.choice"), ({"structured": "json"}, "structured"),
    ({"structured": {"json_object": 1}}, "structured.json_object"),
])
def test_new_fields_are_validated(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_new_fields_defaults_and_normalisation():
    from workers.sampling import MAX_N
    from workers.structured_output import StructuredOutputs
    p = SamplingParams()
    assert (p.n, p.logit_bias, p.prompt_logprobs, p.structured, MAX_N) == (1, {}, None, None, 16)
    # JSON object keys are strings: they become token ids; values become floats.
    assert SamplingParams(logit_bias={"5": 100, " 7": -100, 9: 0.5}).logit_bias == {5: 100.0, 7: -100.0, 9: 0.5}
    assert SamplingParams(max_tokens=None).max_tokens is None  # until the context ends
    s = SamplingParams.from_dict({"structured": {"json_schema": {"type": "object"}}, "n": 16, "prompt_logprobs": 0})
    assert isinstance(s.structured, StructuredOutputs) and s.structured.kind == "json_schema"
    assert SamplingParams.from_dict(s.to_dict()) == s


def test_logit_bias_forces_and_bans_tokens():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    top = logits.argmax(-1).tolist()
    forced = Sampler()(logits, states([SamplingParams(temperature=0, logit_bias={11: 100}), greedy,
                                       SamplingParams(temperature=1.0, seed=1, logit_bias={11: 100})]))
    assert [r.token_id for r in forced] == [11, top[1], 11]  # the middle row is untouched
    # -100 bans: a banned top token is never drawn, greedy or not, over many draws.
    banned = SamplingParams(temperature=0, logit_bias={top[0]: -100})
    assert Sampler()(logits[[0]], states([banned]))[0].token_id != top[0]
    hot = logits[[0]].clone()
    hot[0, 3] = 5.0  # the likely token, banned
    draws = run_steps(Sampler(), hot, states([SamplingParams(temperature=1.0, seed=2, logit_bias={3: -100})]), 200)
    assert 3 not in draws and len(set(draws)) > 5


def test_a_sequences_logit_bias_tensors_are_built_once(monkeypatch):
    """The bias is turned into tensors at the first step and reused (rebuilding them every step cost the whole
    batch ~22 ms a step for a 128k-entry bias); a dtype change (another model runner) rebuilds them."""
    import workers.sampling as sampling

    built = []
    real_tensor = torch.tensor

    def counting(data, *args, **kwargs):
        built.append(len(data) if isinstance(data, list) else 1)
        return real_tensor(data, *args, **kwargs)

    bias = {i: -1.0 for i in range(0, 4000, 2)}
    st = states([SamplingParams(temperature=0, logit_bias=bias)])
    logits = torch.zeros(1, 4000)
    monkeypatch.setattr(sampling.torch, "tensor", counting)
    first = sampling.apply_logit_masks(logits, st)
    built_at_first = sum(n == len(bias) for n in built)
    for _ in range(5):
        again = sampling.apply_logit_masks(logits, st)
    assert built_at_first == 2 and sum(n == len(bias) for n in built) == 2   # ids and values, once
    assert torch.equal(first, again) and again[0, 0] == -1.0 and again[0, 1] == 0.0
    sampling.apply_logit_masks(logits.to(torch.float64), st)
    assert sum(n == len(bias) for n in built) == 4


def test_logit_bias_shifts_the_distribution_but_not_the_logprobs():
    logits = torch.zeros(1, 4)
    p = SamplingParams(temperature=1.0, seed=0, logit_bias={2: math.log(9.0)}, logprobs=1)  # token 2: 9x as likely
    sampler, st = Sampler(), states([p])
    results = []
    for _ in range(600):
        r = sampler(logits, st)[0]
        st[0].output_token_ids.append(r.token_id)
        results.append(r)
    share = sum(r.token_id == 2 for r in results) / len(results)
    assert 0.65 < share < 0.85  # 9 / 12 = 0.75
    # logprobs describe the model's own distribution (uniform here), as for penalties
    assert all(abs(r.logprobs[r.token_id] - math.log(0.25)) < 1e-5 for r in results)


def test_n_completions_draw_from_their_own_seed_streams():
    logits = torch.randn(1, 60, generator=torch.Generator().manual_seed(3))
    p = SamplingParams(temperature=1.0, seed=11, n=3)
    streams = [run_steps(Sampler(), logits, [SamplingState.create(p, [1], seed_offset=i)], 20) for i in range(3)]
    again = [run_steps(Sampler(), logits, [SamplingState.create(p, [1], seed_offset=i)], 20) for i in range(3)]
    assert streams == again and len({tuple(s) for s in streams}) == 3
    # completion i draws what a request seeded with seed + i draws
    assert streams[2] == run_steps(Sampler(), logits, states([SamplingParams(temperature=1.0, seed=13)]), 20)


@pytest.mark.parametrize("vocab", [50, 8 * ARGMAX_BLOCK, 32000, 128256, 128256 + 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_tokens_equal_torch_argmax(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=g).to(dtype)
    logits[1] = 0.0                                     # all equal: the first index
    logits[2, [3, vocab // 2, vocab - 1]] = 50.0        # ties: the first of them
    logits[3, vocab - 1] = 50.0                         # the maximum in the last (perhaps shorter) block
    logits[4, [vocab // 3, vocab - 2]] = float("nan")   # a NaN counts as the maximum, the first one wins
    logits[5, ARGMAX_BLOCK - 1 if vocab > ARGMAX_BLOCK else 0] = 60.0   # at a block's end
    logits[6] = float("-inf")
    logits[6, vocab - 1] = -1e30
    assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
