"""Bad input is a typed error naming the problem, one request's failure is its own, and the engine keeps
serving afterwards."""
from __future__ import annotations

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint, make_text_checkpoint
from workers import Engine, InvalidRequestError, PromptTooLongError, QueueFullError, SamplingParams
from workers.errors import HerdError, RequestFailedError


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


def test_a_request_of_n_completions_counts_n_in_the_queue_and_the_refusal_says_so(engine):
    # 2 seats + 3 queued. A request of n=4 queues its first completion; once its prompt is prefilled (one step)
    # the 3 others join the queue: one takes the free seat, 2 wait. One more request fills the queue.
    ids = [engine.add_request([5, 6, 7], SamplingParams(n=4, max_tokens=8, ignore_eos=True))]
    engine.step()
    ids.append(engine.add_request([5, 6, 7], GOOD))
    with pytest.raises(QueueFullError, match=r"^3 sequences already waiting \(max_queued_requests=3; a request of n "
                                             r"completions counts n\)$"):
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


def test_stop_token_ids_outside_the_vocabulary(engine):
    with pytest.raises(InvalidRequestError) as e:
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, stop_token_ids=[3, 512]))  # vocab is 512
    assert e.value.field == "stop_token_ids" and "512" in str(e.value)
    assert not engine.has_unfinished()
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                     stop_token_ids=[511]))[0]
    assert out.finish_reason in ("length", "stop")


def test_max_tokens_beyond_max_model_len_is_capped_not_refused(engine):
    # 50-token prompt, max_model_len 64: max_tokens=1000 is accepted and ends at the context with "length"
    rid = engine.add_request(list(range(3, 53)), SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))
    deltas = []
    while engine.has_unfinished():
        deltas += [d for d in engine.step() if d.request_id == rid]
    assert sum(len(d.token_ids) for d in deltas) == 64 - 50
    assert deltas[-1].finish_reason == "length"
    assert engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_cache_salt_must_be_an_integer(engine):
    for salt in ("tenant", 1.5, True):
        with pytest.raises(InvalidRequestError) as e:
            engine.add_request([5, 6, 7], GOOD, cache_salt=salt)
        assert e.value.field == "cache_salt"
    assert not engine.has_unfinished()


# ---- one request's failure ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_engine(tmp_path_factory):
    """An engine with a real (SentencePiece) tokenizer, so requests are detokenized and stop strings apply."""
    eng = Engine.from_pretrained(make_text_checkpoint(tmp_path_factory.mktemp("ckpt")), dtype="float32",
                                 show_progress=False)
    yield eng
    eng.shutdown()


PROMPTS = [[1, 17, 42, 99, 7], [1, 300, 301, 302], [1, 55, 66, 77, 88, 99]]
TEXT_PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=["never-appears"], logprobs=2)


def run_all(engine, fault=None):
    """Run PROMPTS concurrently; `fault(engine, request_id)` may break the second request after it is added."""
    ids = [engine.add_request(p, TEXT_PARAMS) for p in PROMPTS]
    if fault is not None:
        fault(engine, ids[1])
    finals = {}
    tokens = {rid: [] for rid in ids}
    text = {rid: "" for rid in ids}
    while engine.has_unfinished():
        for d in engine.step():
            tokens[d.request_id] += d.token_ids
            text[d.request_id] += d.text
            if d.finished:
                finals[d.request_id] = d
    return [(tokens[r], text[r], finals[r]) for r in ids]


def boom(*args, **kwargs):
    raise RuntimeError("secret internal detail")


@pytest.mark.parametrize("where", ["detokenizer", "stop strings"])
def test_a_post_processing_failure_fails_only_that_request(text_engine, where):
    clean = run_all(text_engine)

    def fault(engine, rid):
        req = engine._requests[rid].completions[0]  # test-only reach into one request's (only) completion
        if where == "detokenizer":
            req.detok.add = boom
        else:
            req.stops.feed = boom

    faulted = run_all(text_engine, fault)
    tokens, text, final = faulted[1]
    assert final.finish_reason == "error" and isinstance(final.error, RequestFailedError)
    assert isinstance(final.error, HerdError) and "secret" not in str(final.error)
    for i in (0, 2):
        assert faulted[i][:2] == clean[i][:2]  # same tokens and text as without the fault
        assert faulted[i][2].finish_reason == "length" and faulted[i][2].error is None
    s = text_engine.stats()
    assert s.kv_blocks_free == s.kv_blocks_total and s.num_running == 0 and s.num_waiting == 0


def test_offline_generate_reports_a_failed_request_and_finishes_the_rest(text_engine):
    real = text_engine.sampler

    def faulty(logits, states):
        if any(st.prompt_token_ids == PROMPTS[1] for st in states):
            raise RuntimeError("bad row")
        return real(logits, states)
    text_engine.sampler = faulty
    try:
        outs = text_engine.generate(PROMPTS, TEXT_PARAMS)
    finally:
        text_engine.sampler = real
    assert outs[1].finish_reason == "error" and isinstance(outs[1].error, RequestFailedError)
    assert outs[1].token_ids == []
    assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    assert all(len(o.token_ids) == 12 for o in (outs[0], outs[2]))
