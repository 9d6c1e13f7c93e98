"""n > 1: n completions of one prompt share its prefill (the siblings join once the prompt's blocks are in the
prefix cache), each with its own seed stream, streamed with an index, aborted together."""
from __future__ import annotations

import asyncio

import pytest
import torch

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from workers import AsyncEngine, Engine, SamplingParams, StreamDelta

PROMPT = torch.randint(4, LLAMA2_MHA["vocab_size"], (50,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("n"), "llama2", LLAMA2_MHA)


def engine_for(path, **kw) -> Engine:
    return Engine.from_pretrained(path, dtype="float32", show_progress=False, kv_cache_memory=32 << 20, **kw)


def test_seeded_n3_is_reproducible_and_each_completion_has_its_own_stream(path):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    eng = engine_for(path)
    try:
        out = eng.generate([PROMPT], params)[0]
        again = eng.generate([PROMPT], params)[0]
        # Completion i draws what a single request seeded with seed + i draws (the prompt is cached by now, as
        # it was for the siblings).
        alone = [eng.generate([PROMPT], SamplingParams(temperature=1.0, seed=5 + i, max_tokens=12,
                                                       ignore_eos=True))[0].token_ids for i in range(3)]
    finally:
        eng.shutdown()
    tokens = [c.token_ids for c in out.completions]
    assert [c.index for c in out.completions] == [0, 1, 2] and all(len(t) == 12 for t in tokens)
    assert len({tuple(t) for t in tokens}) == 3                      # three different samples
    assert tokens == [c.token_ids for c in again.completions]         # reproducible
    assert tokens == alone
    assert (out.token_ids, out.finish_reason) == (tokens[0], "length")  # the top level is completion 0
    assert all(c.finish_reason == "length" for c in out.completions)


def test_the_prompt_is_prefilled_once(path):
    """50 prompt tokens, blocks of 16: completion 0 computes all 50; each sibling finds the 3 full blocks in the
    prefix cache and computes only the last 2 tokens (the last one is always computed, for its logits)."""
    eng = engine_for(path)
    try:
        out = eng.generate([PROMPT], SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=4, ignore_eos=True))[0]
        stats = eng.stats()
    finally:
        eng.shutdown()
    assert len(out.completions) == 3
    assert stats.prompt_tokens_computed == 50 + 2 * 2
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.num_running == 0


def test_greedy_n_gives_n_equal_completions_and_mixes_with_other_requests(path):
    eng = engine_for(path)
    try:
        single = eng.generate([PROMPT[:20]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
        outs = eng.generate([PROMPT, PROMPT[:20]], [SamplingParams(n=4, temperature=0, max_tokens=8, ignore_eos=True),
                                                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
    finally:
        eng.shutdown()
    assert len({tuple(c.token_ids) for c in outs[0].completions}) == 1 and len(outs[0].completions) == 4
    assert outs[1].token_ids == single.token_ids and len(outs[1].completions) == 1


def test_deltas_of_different_completions_never_merge():
    a = StreamDelta("r", [1], "a", None, None, 3, 0, index=0, prompt_logprobs=[None, {5: -1.0}])
    b = StreamDelta("r", [2], "b", None, "stop", 3, 0, index=0)
    merged = StreamDelta.merged([a, b])
    assert (merged.token_ids, merged.text, merged.finish_reason, merged.index) == ([1, 2], "ab", "stop", 0)
    assert merged.prompt_logprobs == [None, {5: -1.0}]
    with pytest.raises(ValueError):
        StreamDelta.merged([a, StreamDelta("r", [3], "c", None, None, 3, 0, index=1)])


def test_a_backlog_of_deltas_merges_into_one_in_order():
    """What piled up for a client that stopped reading goes out as one delta, built in one pass."""
    deltas = [StreamDelta("r", [i], f"<{i}>", [{i: -0.5}] if i % 2 else None, "length" if i == 999 else None,
                          3, 1, index=2, scheduled_at=5.0 if i == 3 else None) for i in range(1000)]
    one = StreamDelta.merged(deltas)
    assert one.token_ids == list(range(1000)) and one.text == "".join(f"<{i}>" for i in range(1000))
    assert one.logprobs == [{i: -0.5} for i in range(1, 1000, 2)]
    assert (one.finish_reason, one.index, one.scheduled_at, one.num_cached_tokens) == ("length", 2, 5.0, 1)
    assert StreamDelta.merged(deltas[:1]) is deltas[0]
    with pytest.raises(ValueError):
        StreamDelta.merged([deltas[0], StreamDelta("other", [1], "x", None, None, 3, 0, index=2)])


def test_async_stream_carries_every_completion_and_ends_when_all_are_done(path):
    params = SamplingParams(n=3, temperature=1.0, seed=9, max_tokens=10, ignore_eos=True)
    eng = engine_for(path)
    expected = [c.token_ids for c in eng.generate([PROMPT], params)[0].completions]

    async def main():
        async_engine = AsyncEngine(eng)
        try:
            tokens: dict[int, list[int]] = {0: [], 1: [], 2: []}
            finished = []
            async for d in async_engine.generate(PROMPT, params):
                assert not finished or d.index not in finished  # nothing after a completion's final delta
                tokens[d.index] += d.token_ids
                if d.finished:
                    finished.append(d.index)
            return tokens, finished
        finally:
            async_engine.shutdown()

    tokens, finished = asyncio.run(asyncio.wait_for(main(), 60))
    assert sorted(finished) == [0, 1, 2]
    assert [tokens[i] for i in range(3)] == expected


def test_abort_ends_every_completion_and_frees_their_blocks(path):
    long = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=3000, ignore_eos=True)

    async def main():
        eng = AsyncEngine.from_pretrained(path, dtype="float32", show_progress=False, kv_cache_memory=32 << 20)
        try:
            seen = set()
            stream = eng.generate(PROMPT, long, request_id="many")
            async for d in stream:
                seen.add(d.index)
                if len(seen) == 4:
                    break           # the caller goes away: the whole request is aborted
            await stream.aclose()
            for _ in range(500):
                s = eng.stats()
                if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total:
                    return seen, s
                await asyncio.sleep(0.01)
            return seen, eng.stats()
        finally:
            eng.shutdown()

    seen, stats = asyncio.run(asyncio.wait_for(main(), 60))
    assert seen == {0, 1, 2, 3}
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_free == stats.kv_blocks_total


def test_engine_abort_returns_a_final_delta_per_unfinished_completion(path):
    eng = engine_for(path)
    try:
        rid = eng.add_request(PROMPT, SamplingParams(n=3, max_tokens=50, ignore_eos=True, seed=0))
        while not any(d.index == 2 for d in eng.step()):  # until every sibling has its first token
            pass
        finals = eng.abort_request(rid)
        assert sorted(d.index for d in finals) == [0, 1, 2] and all(d.finish_reason == "abort" for d in finals)
        assert eng.abort_request(rid) == [] and eng.abort(rid) is None and not eng.has_unfinished()
        s = eng.stats()
        assert s.kv_blocks_free == s.kv_blocks_total
    finally:
        eng.shutdown()
