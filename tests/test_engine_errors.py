"""Bad input is a typed error naming the problem, and the engine keeps serving afterwards."""
from __future__ import annotations

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from workers import Engine, InvalidRequestError, PromptTooLongError, QueueFullError, SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama2", LLAMA2_MHA)
    eng = Engine.from_pretrained(path, dtype="float32", show_progress=False, max_model_len=64, max_num_seqs=2,
                                 max_queued_requests=3)
    yield eng
    eng.shutdown()


GOOD = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("prompt, field", [
    ([], "prompt"),
    ([5, 512], "prompt_token_ids"),     # vocab is 512: 512 is one past the end
    ([5, -1], "prompt_token_ids"),
    ("", "prompt"),
])
def test_bad_prompts(engine, prompt, field):
    with pytest.raises(InvalidRequestError) as e:
        engine.generate([prompt], GOOD)
    assert e.value.field == field
    assert engine.generate([[5, 6, 7]], GOOD)[0].finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_values(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.field == field


def test_prompt_longer_than_max_model_len(engine):
    with pytest.raises(PromptTooLongError) as e:
        engine.generate([list(range(3, 3 + 64))], GOOD)
    assert "max_model_len is 64" in str(e.value) and e.value.field == "prompt"
    assert isinstance(e.value, InvalidRequestError)
    # generation stops at max_model_len instead of running past it
    out = engine.generate([list(range(3, 3 + 60))], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_one_bad_request_in_a_batch_rejects_the_batch_cleanly(engine):
    with pytest.raises(InvalidRequestError):
        engine.generate([[5, 6], []], GOOD)
    assert not engine.has_unfinished()
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_queue_full(engine):
    # 2 seats in the batch (the next step admits those at once, so they do not count as queued) + 3 queued
    ids = [engine.add_request([5, 6, 7], GOOD) for _ in range(2 + 3)]
    with pytest.raises(QueueFullError):
        engine.add_request([5, 6, 7], GOOD)
    engine.step()  # two are running now; still 3 queued
    with pytest.raises(QueueFullError):
        engine.add_request([5, 6, 7], GOOD)
    for rid in ids:
        engine.abort(rid)
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_abort_frees_blocks_at_once(engine):
    rid = engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    assert engine.stats().kv_blocks_free < engine.stats().kv_blocks_total
    final = engine.abort(rid)
    assert final.finish_reason == "abort"
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_unknown_engine_argument_is_named(tmp_path):
    path = make_checkpoint(tmp_path, "m", LLAMA2_MHA)
    with pytest.raises(InvalidRequestError) as e:
        Engine.from_pretrained(path, max_num_seqz=4)
    assert e.value.field == "max_num_seqz"
