"""Stream pacing: every token goes out, in order; a quiet engine hands each step's tokens over, a loaded one batches."""
from __future__ import annotations

from workers.stream_pacing import PacedDeltas, StreamPacing
from workers.engine import StreamDelta


def delta(tok: int, finish=None) -> StreamDelta:
    return StreamDelta("r", [tok], f"<{tok}>", None, finish, 4, 0)


def run(pacing: StreamPacing, active: int, n: int = 20, step_s: float = 0.03) -> list[StreamDelta]:
    stream, sent = PacedDeltas(pacing), []
    for i in range(n):
        stream.add(delta(i, "length" if i == n - 1 else None))
        now = i * step_s
        if stream.due(now, active):
            sent.append(stream.take(now))
    assert not stream.holding  # the final message always went out
    return sent


def test_interval_follows_load_and_is_capped():
    p = StreamPacing(max_messages_per_s=400, max_interval_s=0.25)
    assert p.interval(1) == 1 / 400 and p.interval(64) == 64 / 400
    assert p.interval(1000) == 0.25
    assert StreamPacing(max_messages_per_s=0).interval(500) == 0.0


def test_quiet_replica_sends_every_token_at_once():
    sent = run(StreamPacing(400, 0.25), active=4)
    assert [d.token_ids for d in sent] == [[i] for i in range(20)]


def test_loaded_replica_batches_without_losing_or_reordering():
    sent = run(StreamPacing(400, 0.25), active=64)          # a message at most every 160 ms, steps of 30 ms
    assert sent[0].token_ids == [0]                          # the first token is never held
    assert sum((d.token_ids for d in sent), []) == list(range(20))
    assert "".join(d.text for d in sent) == "".join(f"<{i}>" for i in range(20))
    assert len(sent) <= 6 and sent[-1].finish_reason == "length"
    assert all(d.finish_reason is None for d in sent[:-1])


def test_async_engine_paces_many_streams_with_the_same_tokens(tmp_path):
    """16 concurrent streams through an AsyncEngine that may send 40 messages/s: far fewer deltas than tokens,
    the first of each stream holding exactly one token, and every stream's tokens those of an unpaced run."""
    import asyncio

    from tests.checkpoints import LLAMA2_MHA, make_checkpoint
    from workers import AsyncEngine, SamplingParams

    path = make_checkpoint(tmp_path, "llama2", LLAMA2_MHA)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    def run(pacing):
        engine = AsyncEngine.from_pretrained(path, dtype="float32", show_progress=False, pacing=pacing)

        async def one(i):
            return [d async for d in engine.generate([5 + i, 6, 7], params)]

        async def all_streams():
            return await asyncio.gather(*(one(i) for i in range(16)))
        try:
            return asyncio.run(all_streams())
        finally:
            engine.shutdown()

    paced = run(StreamPacing(max_messages_per_s=40, max_interval_s=0.25))
    plain = run(StreamPacing(max_messages_per_s=0))
    for p, q in zip(paced, plain):
        assert sum((d.token_ids for d in p), []) == sum((d.token_ids for d in q), [])
        assert len(p[0].token_ids) == 1 and p[-1].finish_reason == "length"
    assert sum(len(p) for p in paced) < sum(len(q) for q in plain)
    # Unpaced, the engine hands over every step's token; the caller merges only deltas that piled up while its
    # loop was busy, which a loaded machine (tests running side by side) does make happen.
    assert all(len(q) <= 40 for q in plain)
