"""AsyncEngine: streaming deltas, abort on cancel, failure turns into EngineUnavailableError."""
from __future__ import annotations

import asyncio

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from workers import AsyncEngine, Engine, EngineUnavailableError, InvalidRequestError, SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama2", LLAMA2_MHA)


@pytest.fixture
def engine(path):
    eng = AsyncEngine.from_pretrained(path, dtype="float32", show_progress=False)
    yield eng
    eng.shutdown()


async def collect(engine, prompt, params=GREEDY, request_id=None):
    deltas = []
    async for d in engine.generate(prompt, params, request_id):
        deltas.append(d)
    return deltas


def test_streams_the_same_tokens_as_the_sync_engine(engine, path):
    prompts = [list(range(5, 30)), list(range(40, 47)), list(range(100, 160))]

    async def main():
        return await asyncio.gather(*(collect(engine, p) for p in prompts))

    streams = asyncio.run(main())
    sync = Engine.from_pretrained(path, dtype="float32", show_progress=False)
    expected = [o.token_ids for o in sync.generate(prompts, GREEDY)]
    sync.shutdown()
    for deltas, exp in zip(streams, expected):
        assert len(deltas) == len(exp)  # one delta per token
        assert [t for d in deltas for t in d.token_ids] == exp
        assert [d.finish_reason for d in deltas][-1] == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[-1].num_prompt_tokens > 0


def test_validation_errors_reach_the_caller(engine):
    async def main():
        with pytest.raises(InvalidRequestError):
            await collect(engine, [])
        return await collect(engine, [5, 6, 7])

    assert asyncio.run(main())[-1].finished


def test_cancelling_a_stream_frees_its_blocks(engine):
    async def main():
        total = engine.stats().kv_blocks_total
        gen = engine.generate(list(range(5, 200)), SamplingParams(max_tokens=200, ignore_eos=True))
        got = 0
        async for _ in gen:
            got += 1
            if got == 3:
                break
        await gen.aclose()
        for _ in range(100):  # the abort is applied by the engine thread between steps
            await asyncio.sleep(0.02)
            s = engine.stats()
            if s.kv_blocks_free == total and s.num_running == 0:
                return True
        return False

    assert asyncio.run(main())


def test_step_failure_makes_engine_unavailable(engine):
    def broken(step):
        raise RuntimeError("shard 1 died")

    engine.engine.executor.execute = broken

    async def main():
        with pytest.raises(EngineUnavailableError):
            await collect(engine, [5, 6, 7])
        with pytest.raises(EngineUnavailableError):
            await collect(engine, [5, 6, 7])

    asyncio.run(main())
    with pytest.raises(EngineUnavailableError):
        engine.check_health()
