"""TP × PP shard groups on a real local Ray: same tokens and logits as the single-process engine, each shard
loads ~1/(T·P) of the weights, a killed shard becomes an error (never a hang), placement follows strategy."""
from __future__ import annotations

import asyncio
import time

import pytest
import ray

from tests.checkpoints import make_checkpoint
from workers import AsyncEngine, Engine, EngineUnavailableError, SamplingParams

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WIDE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=4, dtype="float32")
NARROW_KV = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, dtype="float32", tie_word_embeddings=True)
PROMPTS = [list(range(5, 8)), list(range(10, 50)), list(range(60, 80)), list(range(5, 45)) + [7, 7]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
SHARD = {"CPU": 0.5}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    return {"wide": make_checkpoint(root, "wide", WIDE), "narrow_kv": make_checkpoint(root, "narrow", NARROW_KV)}


def generate(path, tp=1, pp=1, **kw):
    engine = Engine.from_pretrained(path, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype="float32",
                                    show_progress=False, resources_per_shard=SHARD, enable_prefix_caching=True, **kw)
    try:
        outs = engine.generate(PROMPTS, GREEDY)
        return outs, engine.executor.shard_stats()
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def reference(checkpoints):
    return {name: generate(path)[0] for name, path in checkpoints.items()}


def assert_same(outs, ref):
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    for o, r in zip(outs, ref):  # top logprobs of the raw distribution at every generated position
        for a, b in zip(o.logprobs, r.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)


@pytest.mark.parametrize("name, tp, pp", [
    ("wide", 2, 1), ("wide", 4, 1), ("wide", 1, 2), ("wide", 1, 3), ("wide", 2, 2),
    ("narrow_kv", 4, 1),   # TP 4 > 2 kv heads: kv heads are replicated, not rejected
])
def test_parallel_layouts_match_single_process(ray_cluster, checkpoints, reference, name, tp, pp):
    outs, stats = generate(checkpoints[name], tp, pp)
    assert_same(outs, reference[name])
    assert len(stats) == tp * pp
    total = sum(s["weight_bytes_read"] for s in generate_stats_cache(checkpoints[name]))
    for s in stats:  # each shard read only its own slice from the safetensors files
        assert s["weight_bytes_read"] <= 1.35 * total / (tp * pp), s


_single_stats = {}


def generate_stats_cache(path):
    if path not in _single_stats:
        _single_stats[path] = generate(path)[1]
    return _single_stats[path]


def test_explicit_layer_partition(ray_cluster, checkpoints, reference):
    outs, stats = generate(checkpoints["wide"], 1, 2, pp_layer_partition=[4, 2])
    assert_same(outs, reference["wide"])
    assert sorted(tuple(s["layers"]) for s in stats) == [(0, 4), (4, 6)]


def test_killed_shard_fails_requests_and_health(ray_cluster, checkpoints):
    engine = AsyncEngine.from_pretrained(checkpoints["wide"], tensor_parallel_size=2, dtype="float32",
                                         show_progress=False, resources_per_shard=SHARD, collective_timeout_s=20)

    async def run():
        got = 0
        start = time.monotonic()
        with pytest.raises(EngineUnavailableError):
            async for _ in engine.generate(list(range(5, 40)), SamplingParams(max_tokens=400, ignore_eos=True)):
                got += 1
                if got == 2:
                    ray.kill(engine.engine.executor.workers[1], no_restart=True)
        return time.monotonic() - start

    try:
        elapsed = asyncio.run(run())
        assert elapsed < 30
        with pytest.raises(EngineUnavailableError):
            engine.check_health()
    finally:
        engine.shutdown()
    # a fresh engine can be built afterwards (what a Serve replica restart does)
    outs, _ = generate(checkpoints["wide"], 2, 1)
    assert len(outs) == len(PROMPTS)


def test_bad_layouts_are_rejected_clearly(ray_cluster, checkpoints):
    from workers.errors import CheckpointError
    with pytest.raises(CheckpointError, match="must divide num_attention_heads"):
        Engine.from_pretrained(checkpoints["wide"], tensor_parallel_size=3, resources_per_shard=SHARD)
    with pytest.raises(CheckpointError, match="pp_layer_partition"):
        Engine.from_pretrained(checkpoints["wide"], pipeline_parallel_size=2, pp_layer_partition=[5, 2],
                               resources_per_shard=SHARD)
