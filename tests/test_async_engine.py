"""AsyncEngine: streaming deltas; a cancel in every stage of a request's life frees everything; one request's
failure stays its own; a failed, crashed or hung engine ends every stream with EngineUnavailableError.

Faults are injected here, by wrapping the engine's executor / sampler / stats (never through hooks in product
code)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from workers import AsyncEngine, Engine, EngineUnavailableError, InvalidRequestError, QueueFullError, SamplingParams
from workers.errors import RequestFailedError

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama2", LLAMA2_MHA)


@pytest.fixture
def make_engine(path):
    engines = []

    def make(**engine_args):
        engines.append(AsyncEngine.from_pretrained(path, dtype="float32", show_progress=False, **engine_args))
        return engines[-1]
    yield make
    for eng in engines:
        eng.shutdown()


@pytest.fixture
def engine(make_engine):
    return make_engine()


class Gate:
    """Holds the engine thread inside the forward pass of the first step for which `when(step)` is true,
    until `release` is set (or 30 s pass: a failing test never hangs the suite)."""

    def __init__(self, engine: AsyncEngine, when=lambda step: True):
        self.entered, self.release = threading.Event(), threading.Event()
        real = engine.engine.executor.execute

        def execute(step):
            if not self.entered.is_set() and when(step):
                self.entered.set()
                self.release.wait(30)
            return real(step)
        engine.engine.executor.execute = execute

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the engine never reached the gated step"


async def until(predicate, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def run(coro, timeout: float = 60.0):
    """asyncio.run with a bound, so a regression fails instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def idle_and_free(engine: AsyncEngine) -> bool:
    s = engine.stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_free == s.kv_blocks_total


LONG = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)  # runs for seconds unless aborted


async def collect(engine, prompt, params=GREEDY, request_id=None, **kwargs):
    deltas = []
    async for d in engine.generate(prompt, params, request_id, **kwargs):
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
        # One delta per step the caller kept up with; a caller that fell behind gets the missed tokens merged.
        assert 1 <= len(deltas) <= len(exp) and all(d.token_ids for d in deltas)
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


# ---- a cancel in every stage of a request's life ----------------------------------------------------------
def test_cancel_before_the_submission_is_applied(engine):
    """The caller is cancelled while its submission still waits behind a busy engine thread (the race that
    used to leave the request admitted, running to max_tokens): it must never produce a token."""
    other = [5, 6, 7]

    async def main():
        gate = Gate(engine)
        first = asyncio.create_task(collect(engine, other))
        await gate.wait_entered()                 # the engine thread is now stuck inside a step
        late = asyncio.create_task(collect(engine, list(range(10, 90)), LONG))
        await asyncio.sleep(0.05)                 # it has sent its submission and awaits admission
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        gate.release.set()                        # now the engine applies the submission, then the abort
        assert (await first)[-1].finish_reason == "length"
        await until(lambda: idle_and_free(engine) and not engine.engine.has_unfinished())
        s = engine.stats()
        assert s.prompt_tokens == len(other) and s.generation_tokens == GREEDY.max_tokens  # nothing of `late`

    run(main())


def test_cancel_while_queued_in_the_scheduler(make_engine):
    engine = make_engine(max_num_seqs=1)

    async def main():
        running = asyncio.create_task(collect(engine, [5, 6, 7], LONG))
        await until(lambda: engine.stats().num_running == 1)
        queued = asyncio.create_task(collect(engine, list(range(10, 90)), LONG))
        await until(lambda: engine.stats().num_waiting == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await until(lambda: engine.stats().num_waiting == 0)
        assert engine.stats().num_running == 1 and not running.done()  # the running one is undisturbed
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await until(lambda: idle_and_free(engine))
        assert engine.stats().prompt_tokens == 3  # the queued request never started

    run(main())


def test_cancel_while_prefilling(make_engine):
    engine = make_engine(max_num_batched_tokens=16)  # a 200-token prompt takes 13 prefill steps

    async def main():
        gate = Gate(engine, when=lambda step: step.prefills and step.positions[0] >= 32)  # the third chunk
        task = asyncio.create_task(collect(engine, list(range(5, 205)), LONG))
        await gate.wait_entered()
        assert engine.engine.stats().kv_blocks_free < engine.engine.stats().kv_blocks_total
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.release.set()
        await until(lambda: idle_and_free(engine) and not engine.engine.has_unfinished())
        assert engine.stats().generation_tokens == 0

    run(main())


@pytest.mark.parametrize("how", ["break", "cancel"])
def test_cancel_while_decoding(engine, how):
    async def main():
        got = []

        async def consume():
            gen = engine.generate(list(range(5, 200)), LONG)
            async for d in gen:
                got.append(d)
                if how == "break" and len(got) == 3:
                    break
            await gen.aclose()

        task = asyncio.create_task(consume())
        if how == "cancel":
            await until(lambda: len(got) >= 3)
            task.cancel()
        with pytest.raises(asyncio.CancelledError) if how == "cancel" else _nothing():
            await task
        await until(lambda: idle_and_free(engine) and not engine.engine.has_unfinished())
        assert engine.stats().generation_tokens < LONG.max_tokens

    run(main())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---- one request's failure is its own -----------------------------------------------------------------
def test_a_sampling_failure_fails_only_that_request(engine):
    victim = list(range(40, 47))
    prompts = [list(range(5, 30)), victim, list(range(100, 160))]
    seeded = SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True)
    params = [GREEDY, GREEDY, seeded]

    async def run_all():
        return await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params)),
                                    return_exceptions=True)

    clean = run(run_all())
    real = engine.engine.sampler

    def faulty(logits, states):
        results = real(logits, states)  # after the draw: the seeded row's generator has moved on
        if any(st.prompt_token_ids == victim and len(st.output_token_ids) >= 2 for st in states):
            raise RuntimeError("boom: internal detail")
        return results
    engine.engine.sampler = faulty
    faulted = run(run_all())

    assert isinstance(faulted[1], RequestFailedError) and "boom" not in str(faulted[1])
    for i in (0, 2):  # the others: the same tokens as without the fault (the seeded one too)
        assert [t for d in faulted[i] for t in d.token_ids] == [t for d in clean[i] for t in d.token_ids]
        assert faulted[i][-1].finish_reason == "length"
    engine.check_health()  # the engine itself is fine

    async def settle():
        await until(lambda: idle_and_free(engine))
    run(settle())


# ---- a failed, crashed or hung engine ------------------------------------------------------------------
def test_a_hung_step_fails_health_and_ends_every_stream_at_once(make_engine):
    engine = make_engine(step_timeout_s=0.3)

    async def main():
        gate = Gate(engine, when=lambda step: step.num_decode > 0)  # hangs once decoding has begun
        tasks = [asyncio.create_task(collect(engine, list(range(5 + i, 40)), LONG)) for i in range(3)]
        await gate.wait_entered()
        engine.check_health()                    # a step in progress is fine ...
        await asyncio.sleep(0.4)
        with pytest.raises(EngineUnavailableError, match="step_timeout_s"):
            engine.check_health()                # ... until it runs past the limit
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5)
        assert all(isinstance(r, EngineUnavailableError) for r in results), results
        assert not gate.release.is_set()         # they ended while the step is still stuck
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(collect(engine, [5, 6, 7]), timeout=1)  # later calls fail fast
        with pytest.raises(EngineUnavailableError):
            engine.check_health()
        gate.release.set()                       # if the step ever returns, the engine frees everything
        await until(lambda: idle_and_free(engine) and not engine.engine.has_unfinished())

    run(main())


def test_a_crashed_engine_thread_fails_health_and_streams(engine):
    real_stats = engine.engine.stats

    def stats():
        if threading.current_thread().name == "herd-engine":
            raise RuntimeError("a bug in the loop")
        return real_stats()

    async def main():
        engine.engine.stats = stats
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(collect(engine, [5, 6, 7], LONG), timeout=5)
        await until(lambda: not engine._thread.is_alive())
        with pytest.raises(EngineUnavailableError, match="crashed"):
            engine.check_health()
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(collect(engine, [5, 6, 7]), timeout=1)

    run(main())


def test_shutdown_ends_open_streams_and_refuses_new_ones(make_engine):
    engine = make_engine()

    async def main():
        task = asyncio.create_task(collect(engine, [5, 6, 7], LONG))
        await until(lambda: engine.stats().num_running == 1)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(task, timeout=5)
        with pytest.raises(EngineUnavailableError):
            await asyncio.wait_for(collect(engine, [5, 6, 7]), timeout=1)

    run(main())


# ---- request ids and prefix-cache salts ----------------------------------------------------------------
def test_a_duplicate_live_request_id_is_refused_without_disturbing_the_live_one(engine):
    prompt = list(range(5, 30))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    async def main():
        expected = [t for d in await collect(engine, prompt, params) for t in d.token_ids]
        got = []
        first = engine.generate(prompt, params, request_id="dup")
        got += (await first.__anext__()).token_ids
        with pytest.raises(InvalidRequestError) as e:
            await collect(engine, [5, 6, 7], request_id="dup")
        assert e.value.field == "request_id"
        async for d in first:
            got += d.token_ids
        assert got == expected
        assert (await collect(engine, [5, 6, 7], request_id="dup"))[-1].finished  # free again once finished

    run(main())


def test_cache_salt_partitions_the_prefix_cache(engine):
    prompt = list(range(5, 60))  # three full 16-token blocks

    async def cached(salt):
        return (await collect(engine, prompt, GREEDY, cache_salt=salt))[-1].num_cached_tokens

    async def main():
        return [await cached(s) for s in (11, 22, 11, 0)]

    assert run(main()) == [0, 0, 48, 0]


def test_abort_by_id_ends_the_callers_stream(engine):
    async def main():
        gen = engine.generate([5, 6, 7], LONG, request_id="to-abort")
        first = await gen.__anext__()
        engine.abort("to-abort")
        rest = [d async for d in gen]
        assert first.finish_reason is None and rest[-1].finish_reason == "abort"
        await until(lambda: idle_and_free(engine))

    run(main())


def test_deltas_that_pile_up_go_out_as_one(engine, path):
    """A caller slower than the engine gets the tokens it missed in one delta (fewer, larger messages on
    every hop after it), with exactly the tokens, text and logprobs of the token-by-token stream."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)

    async def go():
        deltas = []
        stream = engine.generate([5, 6, 7, 8], params)
        deltas.append(await stream.__anext__())             # the first token, then the caller is busy
        # ... until the engine has finished the request. Not "num_running == 0": the first delta can arrive
        # before the engine publishes the stats of the step that made it, and the ones before say 0 too.
        while engine.stats().generation_tokens < params.max_tokens or engine.stats().num_running:
            await asyncio.sleep(0.01)
        # The engine thread posts a step's deltas (call_soon_threadsafe) before it publishes the stats that say
        # the request is done, so they are all in this loop's ready queue now: one loop turn delivers them.
        await asyncio.sleep(0)
        deltas += [d async for d in stream]
        return deltas

    deltas = asyncio.run(go())
    reference = Engine.from_pretrained(path, dtype="float32", show_progress=False)
    try:
        ref = reference.generate([[5, 6, 7, 8]], params)[0]
    finally:
        reference.shutdown()
    assert len(deltas) == 2 and deltas[-1].finish_reason == "length"
    assert sum((d.token_ids for d in deltas), []) == ref.token_ids
    assert sum((d.logprobs for d in deltas), []) == ref.logprobs


def test_the_first_delta_says_when_the_engine_first_scheduled_the_request(engine):
    """StreamDelta.scheduled_at (the end of the queue wait, for the trace's queue span): once, on the first
    delta, between submission and the first token."""
    async def main():
        submitted = time.monotonic()
        deltas = await collect(engine, list(range(5, 30)))
        return submitted, deltas

    submitted, deltas = asyncio.run(main())
    marks = [d.scheduled_at for d in deltas if d.scheduled_at is not None]
    assert len(marks) == 1 and deltas[0].scheduled_at == marks[0]
    assert submitted <= marks[0] <= time.monotonic()


def test_a_full_engine_refuses_at_once_without_waiting_for_its_step(make_engine):
    """max_num_seqs + max_queued_requests requests open: the next one gets QueueFullError from the caller's
    side, even while the engine thread is held inside a step; once one ends, a new one is taken again."""
    engine = make_engine(max_num_seqs=1, max_queued_requests=1)

    async def main():
        running = asyncio.create_task(collect(engine, list(range(5, 30)), LONG))
        queued = asyncio.create_task(collect(engine, list(range(40, 60)), GREEDY))
        await until(lambda: engine.stats().num_running == 1 and engine.stats().num_waiting == 1)
        gate = Gate(engine)
        await gate.wait_entered()            # the engine thread is stuck in a step now
        try:
            t0 = time.monotonic()
            with pytest.raises(QueueFullError):
                await collect(engine, [5, 6, 7])
            refused_in = time.monotonic() - t0
        finally:
            gate.release.set()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await queued                         # it gets the seat, and finishes
        deltas = await collect(engine, [5, 6, 7])  # and then there is room again
        return refused_in, deltas

    refused_in, deltas = run(main())
    assert refused_in < 1.0 and deltas[-1].finished
