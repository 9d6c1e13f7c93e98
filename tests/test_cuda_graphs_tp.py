"""Decode graphs of the shards of a TP x PP group, on the CPU: the forward a shard captures, run eagerly on
padded static inputs, equals the unpadded step, for two pipeline stages (one process) and across a real
2-process gloo TP group (the TP all-reduces and the logits' all-gather through the group's capture-safe twin,
built by the same code that builds NCCL's); every rank agrees on the buckets, pads the step identically and
warms its buckets up in one order. Capture and replay themselves need CUDA, and NCCL needs a GPU a rank."""
from __future__ import annotations

import multiprocessing
import queue
import traceback

import pytest
import torch

from tests.checkpoints import make_checkpoint
from tests.test_cuda_graphs import EagerReplay, decode, fill_cache
from workers import cuda_graphs as cg
from workers.config import ModelConfig
from workers.model_runner import ModelRunner
from workers.shard import ShardInfo

# vocab 301: the second TP rank's vocabulary slice ends in a padding row.
SPEC = dict(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, dtype="float32")
BLOCKS, SCRATCH = 41, 40            # the runner's cache; its last block: the padding rows' scratch block
STEP = dict(tables=[[0, 1, 2], [5, 6], [9]], lens=[11, 7, 3], ids=[17, 42, 299])   # 3 rows: the bucket of 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("graphs-tp"), "tp", SPEC)


def shard_runner(path, shard: ShardInfo, group=None) -> ModelRunner:
    cfg = ModelConfig.from_pretrained(str(path))
    runner = ModelRunner(cfg, shard=shard, group=group, dtype=torch.float32, device="cpu", max_model_len=64,
                         block_size=4)
    runner.load_weights(str(path), show_progress=False)
    runner.allocate_kv_cache(BLOCKS)
    return runner


def real_rows_unchanged(runner, cache_after) -> bool:
    """Every block but the scratch one holds what the unpadded step left there."""
    return all(torch.equal(k[:SCRATCH], k2[:SCRATCH]) and torch.equal(v[:SCRATCH], v2[:SCRATCH])
               for (k, v), (k2, v2) in zip(runner.kv_caches, cache_after))


def test_pipeline_stages_replay_their_part(checkpoint):
    """Stage 0's graph forward returns the hidden states the next stage receives; stage 1's reads them from its
    static buffer (padding rows zero) and returns the logits: both equal the eager stages', caches too."""
    stages = [shard_runner(checkpoint, ShardInfo(pp_rank=p, pp_size=2, layer_start=p, layer_end=p + 1))
              for p in (0, 1)]
    step = decode(STEP["tables"], STEP["lens"], ids=STEP["ids"])
    for seed, r in enumerate(stages):
        fill_cache(r, seed)
    hidden = stages[0].execute(step)
    expected = stages[1].execute(step, hidden)
    caches_after = [[(k.clone(), v.clone()) for k, v in r.kv_caches] for r in stages]
    for seed, r in enumerate(stages):
        fill_cache(r, seed)
        r.decode_graphs = EagerReplay(r, max_batch=8, padding_block=SCRATCH)
    assert stages[0].decode_graphs.inputs.hidden is None
    assert stages[1].decode_graphs.inputs.hidden.shape == (8, SPEC["hidden_size"])
    got_hidden = stages[0].execute(step)
    torch.testing.assert_close(got_hidden, hidden, rtol=1e-5, atol=1e-5)
    got = stages[1].execute(step, got_hidden)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert stages[1].decode_graphs.inputs.hidden[3:4].abs().sum() == 0            # the padding row of bucket 4
    for r, after in zip(stages, caches_after):
        assert real_rows_unchanged(r, after)
    with pytest.raises(ValueError):                   # a later stage's graph without its input: a clear error
        stages[1].decode_graphs.inputs.load(step, 4)


# ---- a real 2-process TP group over gloo ------------------------------------------------------------------

class Poisoned:
    """Stands in for the TP group's blocking (eager) process group while the graph forwards run: any
    collective that reaches it fails, so the test shows they all went to the capture-safe twin."""


def tp_rank(rank: int, init_method: str, path: str, results) -> None:
    """One TP rank: a real ShardWorker (without Ray) set up as the executor sets it up, each rank requesting a
    different largest batch; then the eager step, the warm-up of every bucket in capture order and the replayed
    step through the capture-safe group; what the parent compares goes back through `results`."""
    try:
        import torch.distributed as dist
        from workers.parallel import shard_worker

        torch.set_num_threads(1)
        # What CUDA with the Triton attention would request (the CPU requests 0); the group takes the smaller.
        shard_worker.requested_max_batch = lambda runner: 8 if rank == 0 else 16
        worker = shard_worker.ShardWorker(ModelConfig.from_pretrained(path), ShardInfo(tp_rank=rank, tp_size=2),
                                          torch.float32, 64, 4)
        worker.init(init_method, 60)
        worker.load_weights(path)
        worker.allocate_kv_cache(BLOCKS)
        runner, group = worker.runner, worker.comm.tp_group
        out = {"rank": rank, "agreed": runner.agreed_graph_batch, "capture_safe": group.capture_safe,
               "twin": group.graph_group is not group.group}
        step = decode(STEP["tables"], STEP["lens"], ids=STEP["ids"])
        fill_cache(runner, seed=rank)
        expected = runner.execute(step)
        cache_after = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        fill_cache(runner, seed=rank)

        decoder = EagerReplay(runner, max_batch=runner.agreed_graph_batch, padding_block=SCRATCH)
        out["buckets"], out["order"] = decoder.buckets, decoder.capture_order()
        before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        blocking, group.group = group.group, Poisoned()
        try:
            with torch.inference_mode(), decoder.collectives():       # what capture() does, minus CUDA
                for bucket in decoder.capture_order():
                    decoder.inputs.load_placeholder(bucket)
                    cg.static_forward(runner, decoder.inputs, bucket)
            out["warm_up_kept_real_rows"] = real_rows_unchanged(runner, before)
            fill_cache(runner, seed=rank)
            runner.decode_graphs = decoder
            got = runner.execute(step)
            fill_cache(runner, seed=rank)
            returned = worker.execute(step)           # what goes back to the driver: rank 0's logits
        finally:
            group.group = blocking
        out["returned"] = None if returned is None else float(abs(returned - expected.numpy()).max())
        out["max_abs_diff"] = float((got - expected).abs().max())
        out["shape"] = tuple(got.shape)
        out["cache_equal"] = real_rows_unchanged(runner, cache_after)
        out["padded_rows"] = decoder.inputs.rows[:, :4].tolist()
        out["padded_tables"] = decoder.inputs.tables[:4, :3].tolist()
        try:                                          # ranks that disagree raise, on every rank
            group.check_same(rank, "a test value")
            out["disagreement_raised"] = False
        except RuntimeError:
            out["disagreement_raised"] = True
        dist.destroy_process_group()
        results.put(out)
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put({"rank": rank, "error": traceback.format_exc()})


@pytest.mark.timeout(300)
def test_tp2_group_replays_the_unpadded_step_over_gloo(checkpoint, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = f"file://{tmp_path / 'rendezvous'}"
    procs = [ctx.Process(target=tp_rank, args=(r, init_method, str(checkpoint), results), daemon=True)
             for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        outs = sorted((results.get(timeout=240) for _ in procs), key=lambda o: o["rank"])
    except queue.Empty:
        pytest.fail("a TP rank neither finished nor failed within 240 s (a collective that never paired up?)")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    for o in outs:
        assert "error" not in o, o.get("error")
        assert o["agreed"] == 8 and o["capture_safe"] and o["twin"]
        assert o["buckets"] == (1, 2, 4, 8) and o["order"] == (8, 4, 2, 1)
        assert o["warm_up_kept_real_rows"]            # padding-only warm-ups write the scratch block alone
        assert o["shape"] == (3, SPEC["vocab_size"]) and o["max_abs_diff"] < 1e-5
        assert o["cache_equal"]                       # this rank's kv heads: the real rows as the unpadded step
        assert o["disagreement_raised"]
    assert outs[0]["returned"] < 1e-5 and outs[1]["returned"] is None
    # Same step in, same padded inputs on every rank (so the same graph, the same collectives).
    assert outs[0]["padded_rows"] == outs[1]["padded_rows"]
    assert outs[0]["padded_tables"] == outs[1]["padded_tables"]
    assert outs[0]["padded_rows"][0] == STEP["ids"] + [0]
