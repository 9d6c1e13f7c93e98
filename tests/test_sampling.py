"""SamplingParams validation, the batched sampler, penalties, logprobs and stop strings."""
from __future__ import annotations

import math

import pytest
import torch

from workers.errors import InvalidRequestError
from workers.sampling import (Sampler, SamplingParams, SamplingState, apply_penalties, filter_logits,
                              stop_string_cut, stream_safe_length)


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"seed": -3}, "seed"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logprobs": 21}, "logprobs"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_from_dict_rejects_unknown_keys_and_accepts_a_single_stop_string():
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams.from_dict({"max_tokens": 4, "temprature": 0.5})
    assert e.value.field == "temprature"
    assert SamplingParams.from_dict({"stop": "END"}).stop == ["END"]


def states(params_list, prompt=(1, 2, 3)):
    return [SamplingState.create(p, list(prompt)) for p in params_list]


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    seeded = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler()

    def draw(batch_params, row_logits_index):
        sts = states(batch_params)
        seq = []
        for _ in range(20):
            seq.append(sampler(logits[row_logits_index], sts)[0].token_id)
        return seq

    alone = draw([seeded], [0])
    other = SamplingParams(temperature=1.0)
    in_batch = draw([seeded, other, SamplingParams(temperature=0.5, seed=3)], [0, 1, 2])
    assert alone == in_batch
    assert draw([SamplingParams(temperature=1.0, seed=8)], [0]) != alone


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {9, 8}),
    (SamplingParams(top_p=0.5), {9}),                     # the top token alone holds > 50% of the mass
    (SamplingParams(min_p=0.3), {9, 8}),
])
def test_filters_restrict_the_support(params, allowed):
    logits = torch.tensor([[0.0] * 8 + [2.0, 3.0]])       # token 9 ≈ 0.6, token 8 ≈ 0.22 of the mass
    sampler = Sampler()
    seen = {sampler(logits, states([params]))[0].token_id for _ in range(300)}
    assert seen == allowed


def test_top_p_boundary_keeps_exactly_the_nucleus():
    row = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    kept = filter_logits(row, top_k=-1, top_p=0.8, min_p=0.0)
    assert torch.isfinite(kept).tolist() == [True, True, False]


def test_penalties_match_the_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    st = SamplingState.create(SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
                              prompt_token_ids=[0])
    st.output_token_ids += [1, 1, 2]
    out = apply_penalties(logits.clone(), [st])
    # repetition (prompt+output: 0,1,2): 2/2=1, -1*2=-2, 0.5/2=0.25; then output counts {1:2, 2:1}
    expected = torch.tensor([[1.0, -2.0 - 0.5 * 2 - 0.25, 0.25 - 0.5 - 0.25, 1.0]])
    assert torch.allclose(out, expected)


def test_greedy_is_argmax_and_penalised_greedy_changes_choice():
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    assert Sampler()(logits, states([SamplingParams(temperature=0)]))[0].token_id == 1
    st = SamplingState.create(SamplingParams(temperature=0, presence_penalty=1.0), [0])
    st.output_token_ids.append(1)
    assert Sampler()(logits, [st])[0].token_id == 2


def test_logprobs_are_raw_top_n_plus_the_sampled_token():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    st = SamplingState.create(SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.5), [1])
    res = Sampler()(logits, [st])[0]
    raw = torch.log_softmax(logits[0], -1)
    assert set(res.logprobs) >= {1, 2}
    for tok, lp in res.logprobs.items():
        assert lp == pytest.approx(raw[tok].item(), abs=1e-6)
    assert res.token_id in res.logprobs


def test_stop_strings_cut_exactly_even_across_deltas():
    assert stop_string_cut("Hello wor", ["world"]) is None
    assert stop_string_cut("Hello world!", ["world"], searched_until=9) == 6
    assert stop_string_cut("abcSTOPxyzEND", ["END", "STOP"]) == 3   # the earliest wins
    text = "The answer is 42.\n\nQ:"
    assert text[:stop_string_cut(text, ["\n\nQ:"])] == "The answer is 42."


def test_streaming_never_emits_part_of_a_stop_string():
    stop = ["</end>"]
    streamed = ""
    text = ""
    for delta in ["Hi", " there", "</", "en", "d>", "tail"]:
        text += delta
        cut = stop_string_cut(text, stop)
        if cut is not None:
            streamed += text[len(streamed):cut]
            break
        safe = stream_safe_length(text, stop)
        streamed += text[len(streamed):safe] if safe > len(streamed) else ""
        assert "<" not in streamed
    assert streamed == "Hi there"
