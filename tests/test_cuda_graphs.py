"""workers/cuda_graphs.py on the CPU: which steps replay a graph and from which bucket, how a step is padded
into the static buffers, and that the forward a graph captures, run eagerly on padded inputs, equals the
unpadded step. Capture and replay themselves need CUDA (benchmarks/gpu_check.py runs them)."""
from __future__ import annotations

import pytest
import torch

from workers import cuda_graphs as cg
from workers.config import ModelConfig
from workers.model_runner import ModelRunner, StepInput
from workers.shard import LocalGroup, ShardInfo


def test_buckets_and_the_bucket_of_a_batch():
    assert cg.buckets_up_to(256) == cg.GRAPH_BUCKETS
    assert cg.buckets_up_to(40) == (1, 2, 4, 8, 16, 24, 32, 40)
    assert cg.buckets_up_to(1) == (1,)
    b = cg.buckets_up_to(256)
    assert [cg.bucket_for(n, b) for n in (1, 2, 3, 5, 16, 17, 33, 200, 256)] == [1, 2, 4, 8, 16, 24, 48, 224, 256]
    assert cg.bucket_for(257, b) is None and cg.bucket_for(0, b) is None


def decode(tables, lens, ids=None):
    n = len(tables)
    bs = 4
    step = StepInput(input_ids=ids or [10 + i for i in range(n)], positions=[L - 1 for L in lens],
                     slot_mapping=[t[(L - 1) // bs] * bs + (L - 1) % bs for t, L in zip(tables, lens)],
                     num_decode=n, decode_block_tables=[list(t) for t in tables], decode_seq_lens=list(lens),
                     sample_indices=list(range(n)))
    return step


def test_only_pure_decode_steps_replay():
    step = decode([[0, 1], [2]], [6, 3])
    assert cg.is_pure_decode(step)
    mixed = decode([[0, 1]], [6])
    mixed.input_ids += [1, 2]
    mixed.positions += [0, 1]
    mixed.slot_mapping += [20, 21]
    mixed.prefills = [(1, 2, 2, [5])]
    mixed.sample_indices = [0, 2]
    assert not cg.is_pure_decode(mixed)
    partial = decode([[0, 1], [2]], [6, 3])
    partial.sample_indices = [1]
    assert not cg.is_pure_decode(partial)
    assert not cg.is_pure_decode(StepInput())


def test_padding_rows_write_the_scratch_block_and_see_one_key():
    step = decode([[7, 8, 9], [3]], [10, 2])
    ids, pos, slots, lens = cg.padded_rows(step, 4, padding_block=30, block_size=4)
    assert ids == [10, 11, 0, 0] and pos == [9, 1, 0, 0]
    assert slots == [9 * 4 + 1, 3 * 4 + 1, 120, 120]
    assert lens == [10, 2, 1, 1]
    assert cg.padded_tables(step, 4, padding_block=30) == [[7, 8, 9], [3, 3, 3], [30, 30, 30], [30, 30, 30]]
    with pytest.raises(ValueError):
        cg.padded_rows(step, 1, 30, 4)


def test_static_buffers_hold_the_padded_step_and_keep_their_addresses():
    inputs = cg.StaticDecodeInputs(max_batch=8, max_blocks=6, block_size=4, padding_block=30,
                                   device=torch.device("cpu"))
    addresses = (inputs.rows.data_ptr(), inputs.tables.data_ptr())
    inputs.load(decode([[0, 1, 2, 3, 4, 5]] * 3, [24, 24, 24]), 4)            # a wide step first
    step = decode([[7, 8], [3]], [6, 2])
    inputs.load(step, 4)
    meta = inputs.metadata(4)
    assert (inputs.rows.data_ptr(), inputs.tables.data_ptr()) == addresses
    assert inputs.input_ids(4).tolist() == [10, 11, 0, 0] and inputs.positions(4).tolist() == [5, 1, 0, 0]
    assert meta.num_decode == 4 and meta.slot_mapping.tolist() == [8 * 4 + 1, 13, 120, 120]
    assert meta.decode_seq_lens.tolist() == [6, 2, 1, 1] and meta.decode_seq_lens.is_contiguous()
    assert meta.decode_block_tables.shape == (4, 6)                           # the graph's full width
    assert meta.decode_block_tables[:, :2].tolist() == [[7, 8], [3, 3], [30, 30], [30, 30]]
    # Columns past the step's width keep the earlier step's values: never read (beyond every seq_len).
    assert meta.decode_block_tables[0, 2:].tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        inputs.load(decode([list(range(7))], [28]), 1)


@pytest.fixture(scope="module")
def runner():
    cfg = ModelConfig.from_dict(dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    r = ModelRunner(cfg, dtype=torch.float32, device="cpu", max_model_len=64, block_size=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in r.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.05) + (p.dim() == 1))
    r.model.pack_weights_for_cpu()
    r.allocate_kv_cache(41)                            # block 40: the padding rows' scratch block
    assert r.decode_graphs is None and r.kv_caches[0][0].shape[0] == 41    # CPU: eager, no extra block
    return r


def fill_cache(runner, seed=1):
    g = torch.Generator().manual_seed(seed)
    for k, v in runner.kv_caches:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))


def test_padded_static_forward_equals_the_unpadded_step(runner):
    """The forward each graph captures, run eagerly over the padded static inputs, gives the real rows the
    logits of the unpadded step, and leaves the cache as the unpadded step leaves it."""
    step = decode([[0, 1, 2], [5, 6], [9]], [11, 7, 3], ids=[17, 42, 99])
    fill_cache(runner)
    expected = runner.execute(step)
    cache_after = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    fill_cache(runner)
    inputs = cg.StaticDecodeInputs(max_batch=8, max_blocks=16, block_size=4, padding_block=40,
                                   device=torch.device("cpu"))
    inputs.load(step, 8)
    with torch.inference_mode():
        got = cg.static_forward(runner, inputs, 8)
    assert got.shape == (8, 300)
    torch.testing.assert_close(got[:3], expected, rtol=1e-5, atol=1e-5)
    for (k, v), (k2, v2) in zip(runner.kv_caches, cache_after):       # all but the scratch block
        assert torch.equal(k[:40], k2[:40]) and torch.equal(v[:40], v2[:40])
        assert not torch.equal(k[40], k2[40])


def test_graphs_are_not_wanted_off_cuda_or_when_switched_off(runner, monkeypatch):
    assert not cg.graphs_wanted(runner)
    monkeypatch.setenv("HERD_CUDA_GRAPHS", "0")
    monkeypatch.setattr(runner, "device", torch.device("cuda"))
    assert not cg.graphs_wanted(runner)
    monkeypatch.setenv("HERD_CUDA_GRAPHS", "1")
    assert not cg.graphs_wanted(runner)                # the portable / CPU attention: nothing to replay
    from workers.triton_attention import TritonPagedAttention
    for layer in runner.model.layers:
        monkeypatch.setattr(layer, "attention", TritonPagedAttention())
    assert cg.graphs_wanted(runner) and cg.graph_max_batch(runner) == 256
    monkeypatch.setenv("HERD_CUDA_GRAPH_MAX_BATCH", "40")
    assert cg.requested_max_batch(runner) == cg.graph_max_batch(runner) == 40
    monkeypatch.setenv("HERD_CUDA_GRAPH_MAX_BATCH", "0")
    assert not cg.graphs_wanted(runner)


class FakeTPGroup:
    """What graph_max_batch asks of a TP shard's group: whether its collectives can be captured."""
    capture_safe = False


def test_a_tp_or_pp_shard_captures_what_its_group_agreed(runner, monkeypatch):
    """A shard of a TP x PP group never decides alone: until its group agreed on a largest batch (ShardWorker.init
    sets runner.agreed_graph_batch) it decodes eagerly; with TP, also until its group has capture-safe collectives."""
    from workers.triton_attention import TritonPagedAttention
    monkeypatch.setattr(runner, "device", torch.device("cuda"))
    for layer in runner.model.layers:
        monkeypatch.setattr(layer, "attention", TritonPagedAttention())
    monkeypatch.setattr(runner, "shard", ShardInfo(tp_size=2))
    monkeypatch.setattr(runner.model, "group", FakeTPGroup())
    assert cg.requested_max_batch(runner) == 256 and not cg.graphs_wanted(runner)     # not agreed yet
    monkeypatch.setattr(runner, "agreed_graph_batch", 64)
    assert not cg.graphs_wanted(runner)                                                # no capture-safe group
    monkeypatch.setattr(runner.model.group, "capture_safe", True, raising=False)
    assert cg.graph_max_batch(runner) == 64                                            # the group's, not 256
    monkeypatch.setattr(runner, "agreed_graph_batch", 0)                                  # a rank said no
    assert not cg.graphs_wanted(runner)
    monkeypatch.setattr(runner, "shard", ShardInfo(pp_rank=1, pp_size=2))                # PP only: no collectives
    monkeypatch.setattr(runner.model, "group", LocalGroup())
    monkeypatch.setattr(runner, "agreed_graph_batch", 8)
    assert cg.graph_max_batch(runner) == 8


class EagerReplay(cg.CudaGraphDecoder):
    """CudaGraphDecoder with its one CUDA-only step (replaying a graph) replaced by running the captured forward
    eagerly, with the collectives a capture records (a TP group's capture-safe ones): everything else of `run`
    (bucket, padding, static buffers, the runner's dispatch) is the real code."""

    def replay(self, bucket):
        with self.runner.model.group.graph_mode():
            return cg.static_forward(self.runner, self.inputs, bucket)


def test_the_runner_sends_pure_decodes_to_its_graphs(runner, monkeypatch):
    step = decode([[0, 1, 2], [5, 6], [9]], [11, 7, 3], ids=[17, 42, 99])
    fill_cache(runner)
    expected = runner.execute(step)
    decoder = EagerReplay(runner, max_batch=8, padding_block=40)
    assert decoder.buckets == (1, 2, 4, 8)
    calls = []
    monkeypatch.setattr(decoder, "replay", lambda bucket: calls.append(bucket) or EagerReplay.replay(decoder, bucket))
    monkeypatch.setattr(runner, "decode_graphs", decoder)
    fill_cache(runner)
    torch.testing.assert_close(runner.execute(step), expected, rtol=1e-5, atol=1e-5)
    assert calls == [4]                                     # 3 sequences: the bucket of 4
    mixed = decode([[0, 1, 2]], [11])
    mixed.input_ids, mixed.positions, mixed.slot_mapping = [5, 6], [0, 1], [80, 81]
    mixed.num_decode, mixed.decode_block_tables, mixed.decode_seq_lens = 0, [], []
    mixed.prefills, mixed.sample_indices = [(0, 2, 2, [20])], [1]
    runner.execute(mixed)
    assert calls == [4]                                     # a prefill runs eagerly
    nine = decode([[i] for i in range(9)], [1] * 9)
    runner.execute(nine)
    assert calls == [4]                                     # beyond the largest bucket: eagerly
