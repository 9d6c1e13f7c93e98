"""workers/gpu_memory.py: the KV pool's size on a GPU, from given numbers (the device readings need CUDA)."""
from __future__ import annotations

import pytest
import torch

from workers import gpu_memory as gm
from workers.config import ModelConfig
from workers.errors import CheckpointError
from workers.model_runner import ModelRunner

GiB = 1 << 30


def reading(**kw):
    base = dict(total=80 * GiB, free=60 * GiB, allocated=16 * GiB, peak=18 * GiB, graphs=GiB // 2)
    base.update(kw)
    return gm.MemoryReading(**base)


def test_alone_on_the_gpu_the_share_binds():
    # 80 GiB x 0.9 = 72 GiB share; weights + largest step 18 GiB, graphs 0.5 GiB, margin 0.5 GiB -> 53 GiB.
    # The device has 60 GiB free, of which the step takes back 2 GiB: 60 - 2 - 0.5 - 0.5 = 57 GiB.
    m = reading()
    assert gm.kv_cache_bytes(m, 0.9) == 72 * GiB - 18 * GiB - GiB // 2 - gm.NON_TORCH_MARGIN
    assert gm.kv_cache_bytes(m, 0.9, margin=0) == 53 * GiB + GiB // 2


def test_other_replicas_on_the_gpu_leave_less_free():
    # Another replica holds 40 GiB: only 20 GiB is free, although this replica's share (0.9) is larger.
    m = reading(free=20 * GiB)
    assert gm.kv_cache_bytes(m, 0.9, margin=0) == 20 * GiB - 2 * GiB - GiB // 2
    # Two replicas at 0.45 each: the share binds for both (36 GiB - 18.5 GiB).
    assert gm.kv_cache_bytes(reading(free=60 * GiB), 0.45, margin=0) == int(80 * GiB * 0.45) - 18 * GiB - GiB // 2


def test_graph_memory_and_the_largest_step_come_off_the_pool():
    without = gm.kv_cache_bytes(reading(graphs=0), 0.9)
    assert without - gm.kv_cache_bytes(reading(graphs=3 * GiB), 0.9) == 3 * GiB
    assert without - gm.kv_cache_bytes(reading(graphs=0, peak=20 * GiB), 0.9) == 2 * GiB


def test_blocks_and_the_error_that_names_the_limits():
    assert gm.kv_blocks(reading(), 0.9, block_bytes=2 << 20) == gm.kv_cache_bytes(reading(), 0.9) // (2 << 20)
    with pytest.raises(CheckpointError) as e:
        gm.kv_blocks(reading(free=3 * GiB), 0.9, block_bytes=2 << 20)
    message = str(e.value)
    assert "gpu_memory_utilization 0.9" in message and "other processes hold about 61.0 GiB" in message


def test_profile_steps_use_their_own_blocks():
    cfg = ModelConfig.from_dict(dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    runner = ModelRunner(cfg, dtype=torch.float32, device="cpu", max_model_len=100, block_size=16)
    (prefill, decode), blocks = gm.profile_steps(runner, tokens=2048, decode_batch=8)
    assert prefill.num_tokens == 100 and prefill.prefills == [(0, 100, 100, list(range(7)))]   # capped: max_model_len
    assert prefill.sample_indices == [99]
    assert decode.num_decode == 8 and decode.decode_block_tables == [[7 + i] for i in range(8)]
    slots = prefill.slot_mapping + decode.slot_mapping
    assert len(set(slots)) == len(slots) and max(slots) < blocks * 16 and blocks == 15


def small_runner(**kw):
    cfg = ModelConfig.from_dict(dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512))
    return ModelRunner(cfg, dtype=torch.bfloat16, device="cpu", max_model_len=100, block_size=16, **kw)


def test_kv_cache_dtype_fp8_halves_a_block_and_needs_the_triton_attention(monkeypatch):
    assert small_runner().kv_dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="Triton attention"):
        small_runner(kv_cache_dtype="fp8")                         # the CPU path cannot read fp8
    with pytest.raises(CheckpointError, match="kv_cache_dtype"):
        small_runner(kv_cache_dtype="int4")
    from workers import model_runner
    from workers.triton_attention import TritonPagedAttention
    monkeypatch.setattr(model_runner, "select_attention_backend", lambda device: TritonPagedAttention())
    fp8 = small_runner(kv_cache_dtype="fp8")
    assert fp8.kv_dtype == torch.float8_e4m3fn
    assert fp8.block_bytes() * 2 == small_runner().block_bytes()
    fp8.allocate_kv_cache(3)
    assert fp8.kv_caches[0][0].dtype == torch.float8_e4m3fn and fp8.kv_caches[0][0].shape == (3, 16, 1, 16)


def test_herd_plan_reports_the_capacity_both_ways():
    """fp8 holds twice the tokens of a bf16 cache in the same budget (to a block), per replica and layout."""
    from workers.parallel.plan import plan, shape_config
    layouts = plan(shape_config("llama3-8b")[1], gpus_per_node=2, gpu_memory=80 * GiB, max_model_len=8192)
    for layout in layouts:
        assert layout.kv_tokens_fp8 // 16 in (2 * (layout.kv_tokens // 16), 2 * (layout.kv_tokens // 16) + 1)
        assert layout.max_seqs_fp8 >= 2 * layout.max_seqs
    tp1 = next(l for l in layouts if l.name == "TP1")
    assert tp1.max_seqs_fp8 == tp1.kv_tokens_fp8 // 8192


def test_engine_setting_reaches_the_cache(tmp_path):
    """EngineConfig.kv_cache_dtype travels Engine.from_pretrained -> LocalExecutor -> ModelRunner: here, on the
    CPU, fp8 is refused with the reason (and an unknown value by the settings' own check)."""
    from checkpoints import LLAMA2_MHA, make_checkpoint
    from workers import Engine
    from workers.errors import InvalidRequestError
    path = make_checkpoint(tmp_path, "m", LLAMA2_MHA)
    with pytest.raises(CheckpointError, match="Triton attention"):
        Engine.from_pretrained(path, kv_cache_dtype="fp8", show_progress=False)
    with pytest.raises(InvalidRequestError) as e:
        Engine.from_pretrained(path, kv_cache_dtype="int8", show_progress=False)
    assert e.value.field == "kv_cache_dtype"
    engine = Engine.from_pretrained(path, kv_cache_dtype="auto", show_progress=False, kv_cache_memory=1 << 20)
    try:
        assert engine.executor.runner.kv_caches[0][0].dtype == torch.float32
    finally:
        engine.shutdown()
