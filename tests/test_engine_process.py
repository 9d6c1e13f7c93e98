"""EngineProcessClient: the engine in a process of its own behaves as AsyncEngine does for its caller (the same
tokens at concurrency, typed errors with their fields, a cancel at each stage frees every block, abort by id,
duplicate ids, the cache snapshot for the router), and its failures are the replica's: a killed or frozen engine
process ends every open stream at once and fails check_health; a replica that goes away takes its engine
process with it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.serve_fixtures import process_running
from tests.test_async_engine import GREEDY, LONG, collect, idle_and_free, path, run, until  # noqa: F401 - path
from workers import Engine, EngineUnavailableError, InvalidRequestError, SamplingParams
from workers import engine_process
from workers.engine_process import EngineProcessClient, single_malloc_arena
from workers.errors import CheckpointError, PromptTooLongError, QueueFullError, SettingError


@pytest.fixture
def make_client(path):
    clients = []

    def make(**engine_args):
        clients.append(EngineProcessClient(path, dtype="float32", show_progress=False, **engine_args))
        return clients[-1]
    yield make
    for client in clients:
        client.shutdown()
        assert client._proc.poll() is not None  # no engine process outlives its client


@pytest.fixture(scope="module")
def shared(path):
    """One engine process for the tests that leave it healthy (start-up costs seconds)."""
    client = EngineProcessClient(path, dtype="float32", show_progress=False)
    yield client
    client.shutdown()


def test_streams_the_same_tokens_as_the_engine_at_concurrency(shared, path):
    prompts = [list(range(5 + i, 30 + 3 * i)) for i in range(24)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=2)

    async def main():
        return await asyncio.gather(*(collect(shared, p, params) for p in prompts))

    streams = run(main())
    sync = Engine.from_pretrained(path, dtype="float32", show_progress=False)
    try:
        expected = sync.generate(prompts, params)
    finally:
        sync.shutdown()
    for deltas, exp in zip(streams, expected):
        assert [t for d in deltas for t in d.token_ids] == exp.token_ids
        assert sum((d.logprobs for d in deltas), []) == exp.logprobs
        assert deltas[-1].finish_reason == "length" and all(d.finish_reason is None for d in deltas[:-1])
        assert deltas[0].scheduled_at is not None  # the engine process's clock is this one's (monotonic)
        assert deltas[0].scheduled_at <= time.monotonic()
    assert run(until(lambda: idle_and_free(shared))) is None


def test_errors_cross_the_process_with_their_fields(shared):
    # Refused here (validate) and refused there (the engine's own check after the pipe): same types, same fields.
    with pytest.raises(PromptTooLongError) as too_long:
        shared.validate([5] * shared.max_model_len, GREEDY)
    assert too_long.value.field == "prompt"

    async def main():
        with pytest.raises(InvalidRequestError) as refused:
            await collect(shared, [5, 6, 7], SamplingParams(max_tokens=4, stop_token_ids=[10 ** 6]))
        return refused.value

    err = run(main())
    assert err.field == "stop_token_ids" and "outside the vocabulary" in err.message


def test_a_checkpoint_that_does_not_load_fails_the_client_with_its_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError):
        EngineProcessClient(tmp_path, dtype="float32", show_progress=False)


def test_the_router_snapshot_and_stats_come_across(shared):
    prompt = list(range(100, 164))  # four full blocks of 16

    async def main():
        await collect(shared, prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))

    run(main())
    run(until(lambda: len(shared.cached_block_hashes()) >= 4, timeout=5))
    assert shared.cached_block_filter() is not None
    assert shared.stats().prompt_tokens >= len(prompt)


@pytest.mark.parametrize("stage", ["queued", "decoding"])
def test_a_cancel_frees_every_block(make_client, stage):
    """Cancelled while it waits for a seat (max_num_seqs=1, another request holds it) or while decoding: its
    blocks come back and it never runs on."""
    client = make_client(max_num_seqs=1)
    total = client.stats().kv_blocks_total

    async def main():
        holder = asyncio.create_task(collect(client, list(range(5, 40)), LONG))
        await until(lambda: client.stats().num_running == 1)
        if stage == "queued":
            waiter = asyncio.create_task(collect(client, list(range(50, 90)), GREEDY))
            await until(lambda: client.stats().num_waiting == 1)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            await until(lambda: client.stats().num_waiting == 0)
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        await until(lambda: idle_and_free(client))

    run(main())
    s = client.stats()
    assert s.kv_blocks_free == total and s.generation_tokens < LONG.max_tokens


def test_a_full_engine_process_is_refused_on_the_replica_side(make_client):
    client = make_client(max_num_seqs=1, max_queued_requests=1)

    async def main():
        held = [asyncio.create_task(collect(client, list(range(5 + i, 30 + i)), LONG)) for i in range(2)]
        await until(lambda: client.stats().num_running == 1 and client.stats().num_waiting == 1)
        with pytest.raises(QueueFullError, match="max_queued_requests = 2"):
            await collect(client, [5, 6, 7])
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        return await collect(client, [5, 6, 7])

    assert run(main())[-1].finished


def test_a_duplicate_live_id_is_refused_and_abort_by_id_ends_the_live_one(shared):
    async def main():
        live = asyncio.create_task(collect(shared, list(range(5, 30)), LONG, request_id="same"))
        await until(lambda: shared.stats().num_running == 1)
        with pytest.raises(InvalidRequestError):
            await collect(shared, [5, 6, 7], GREEDY, request_id="same")
        assert shared.stats().num_running == 1  # the refusal did not touch the live request
        shared.abort("same")
        deltas = await live
        return deltas

    deltas = run(main())
    assert deltas[-1].finish_reason == "abort"
    run(until(lambda: idle_and_free(shared)))


def test_a_killed_engine_process_ends_every_stream_at_once(make_client):
    client = make_client()

    async def main():
        streams = [asyncio.create_task(collect(client, list(range(5 + i, 30 + i)), LONG)) for i in range(8)]
        await until(lambda: client.stats().num_running == 8)
        t0 = time.monotonic()
        os.kill(client.pid, signal.SIGKILL)
        outcomes = await asyncio.gather(*streams, return_exceptions=True)
        return time.monotonic() - t0, outcomes

    took, outcomes = run(main())
    assert all(isinstance(o, EngineUnavailableError) for o in outcomes), outcomes
    assert took < 5, f"the streams took {took:.1f}s to end"
    with pytest.raises(EngineUnavailableError, match="exited"):
        client.check_health()
    with pytest.raises(EngineUnavailableError):  # later requests fail fast
        run(collect(client, [5, 6, 7]), timeout=5)


def test_a_frozen_engine_process_fails_health_and_ends_its_streams(make_client, monkeypatch):
    client = make_client()
    monkeypatch.setattr(engine_process, "HEARTBEAT_TIMEOUT_S", 1.0)

    async def main():
        stream = asyncio.create_task(collect(client, list(range(5, 30)), LONG))
        await until(lambda: client.stats().num_running == 1)
        os.kill(client.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(1.5)
            with pytest.raises(EngineUnavailableError, match="not answered"):
                client.check_health()
            return await asyncio.gather(stream, return_exceptions=True)
        finally:
            os.kill(client.pid, signal.SIGCONT)

    (outcome,) = run(main())
    assert isinstance(outcome, EngineUnavailableError)


def test_the_engine_process_goes_with_its_replica(path, tmp_path):
    """A replica killed outright (no shutdown) closes the command pipe: its engine process exits by itself."""
    pid_file = tmp_path / "pid"
    script = (
        "import os, sys\n"
        "from workers.engine_process import EngineProcessClient\n"
        f"c = EngineProcessClient({str(path)!r}, dtype='float32', show_progress=False)\n"
        f"open({str(pid_file)!r}, 'w').write(str(c.pid))\n"
        "os._exit(0)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True, timeout=120)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while process_running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not process_running(pid), "the engine process outlived its replica"


def test_the_engine_process_runs_on_its_cpu_cores(make_client):
    last = max(os.sched_getaffinity(0))
    client = make_client(cpu_cores=str(last))
    threads = os.listdir(f"/proc/{client.pid}/task")
    assert len(threads) > 1  # torch's and the engine's threads, all moved
    assert all(os.sched_getaffinity(int(tid)) == {last} for tid in threads)
    assert os.sched_getaffinity(0) != {last} or len(os.sched_getaffinity(0)) == 1  # this process stays put
    out = run(collect(client, [5, 6, 7], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    assert sum(len(d.token_ids) for d in out) == 4


def test_the_engine_process_runs_with_one_malloc_arena_unless_the_environment_says_otherwise(make_client,
                                                                                           monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    client = make_client()
    environ = open(f"/proc/{client.pid}/environ", "rb").read().split(b"\0")
    assert b"MALLOC_ARENA_MAX=1" in environ
    assert single_malloc_arena({}) == {"MALLOC_ARENA_MAX": "1"}
    assert single_malloc_arena({"MALLOC_ARENA_MAX": "4"}) == {}                        # the operator's stays
    assert single_malloc_arena({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}


def test_cpu_cores_the_node_lacks_fail_the_client_with_a_setting_error(path):
    with pytest.raises(SettingError, match="engine_cpu_cores '4096' names CPUs 4096"):
        EngineProcessClient(path, dtype="float32", show_progress=False, cpu_cores="4096")
