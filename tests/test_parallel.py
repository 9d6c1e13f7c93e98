"""TP × PP shard groups on a real local Ray: same tokens and logits as the single-process engine (itself
checked against transformers), each shard loads ~1/(T·P) of the weights, micro-batches overlap across
stages, a killed or hung shard becomes an error (never a hang), and placement follows the strategy across
(simulated) nodes."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tests.checkpoints import make_checkpoint
from cluster.ray_node_start import init_local_ray
from workers import AsyncEngine, Engine, EngineUnavailableError, SamplingParams
from workers.config import ModelConfig
from workers.demo import hf_config
from workers.model_runner import ModelRunner, StepInput
from workers.parallel.placement import assign_bundles
from workers.parallel.ray_executor import RayExecutor, microbatches
from workers.parallel.shard_worker import ShardWorker

WIDE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=16,
            num_key_value_heads=4, dtype="float32")
NARROW_KV = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, dtype="float32", tie_word_embeddings=True)
# Round 1: mixed lengths (with max_num_batched_tokens=48 the long ones are chunked and mixed with decodes).
ROUND1 = [list(range(5, 8)), list(range(10, 50)), list(range(60, 80)), list(range(100, 170))]
# Round 2 reuses round 1's cached prefix blocks (block size 16): prefix-cache hits on the shard group too.
ROUND2 = [list(range(10, 50)) + [7, 8, 9], list(range(100, 150)) + [3], [11, 12]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
SHARD = {"CPU": 0.5}
SMALL = dict(dtype="float32", show_progress=False, enable_prefix_caching=True, max_num_batched_tokens=48,
             kv_cache_memory=8 << 20)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    return {"wide": make_checkpoint(root, "wide", WIDE), "narrow_kv": make_checkpoint(root, "narrow", NARROW_KV)}


def stretched_shard_worker(seconds: float) -> type:
    """A ShardWorker whose every compute takes `seconds` longer, so that pipeline overlap shows on a tiny model
    whatever the machine's load. Defined in a function: Ray ships such a class to its actors by value."""

    class StretchedShardWorker(ShardWorker):
        def init(self, init_method: str, timeout_s: float):
            result = super().init(init_method, timeout_s)
            compute = self.runner.execute

            def stretched(step, hidden):
                out = compute(step, hidden)
                time.sleep(seconds)
                return out

            self.runner.execute = stretched
            return result

    return StretchedShardWorker


def run_rounds(engine: Engine):
    return engine.generate(ROUND1, GREEDY), engine.generate(ROUND2, GREEDY)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """The single-process engine's outputs; for `wide`, first checked against transformers' greedy tokens."""
    refs = {}
    for name, path in checkpoints.items():
        engine = Engine.from_pretrained(path, **SMALL)
        try:
            refs[name] = run_rounds(engine), engine.executor.shard_stats()[0]["weight_bytes_read"]
        finally:
            engine.shutdown()
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(checkpoints["wide"], dtype=torch.float32).eval()
    for prompt, out in zip(ROUND1, refs["wide"][0][0]):
        with torch.no_grad():
            ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert ids[0, len(prompt):].tolist() == out.token_ids
    return refs


def assert_same(outs, ref):
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    for o, r in zip(outs, ref):  # top logprobs of the raw distribution at every generated position
        for a, b in zip(o.logprobs, r.logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


# ---- no Ray needed ---------------------------------------------------------------------------------------

def mixed_step(block_size: int = 4) -> StepInput:
    """3 decodes, a sampling prefill chunk, a non-sampling (partial) chunk, another sampling chunk. Token id =
    flat row index + 1, so a micro-batch's rows can be mapped back."""
    step, row = StepInput(), 0

    def add(n, ctx_len, blocks, sample, decode):
        nonlocal row
        step.input_ids += list(range(row + 1, row + n + 1))
        step.positions += list(range(ctx_len - n, ctx_len))
        step.slot_mapping += [blocks[p // block_size] * block_size + p % block_size for p in range(ctx_len - n, ctx_len)]
        if decode:
            step.num_decode += 1
            step.decode_block_tables.append(blocks)
            step.decode_seq_lens.append(ctx_len)
        else:
            step.prefills.append((row, n, ctx_len, blocks))
        if sample:
            step.sample_indices.append(row + n - 1)
        row += n

    add(1, 6, [0, 1], True, True)
    add(1, 3, [2], True, True)
    add(1, 9, [3, 4, 5], True, True)
    add(7, 7, [6, 7], True, False)
    add(5, 5, [8, 9], False, False)     # a chunk that does not complete its prompt: samples nothing
    add(6, 10, [10, 11, 12], True, False)
    return step


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 6, 9])
def test_split_keeps_rows_and_sample_order(parts):
    step = mixed_step()
    micro = step.split(parts)
    assert 1 <= len(micro) <= min(parts, 6)
    rows = [t - 1 for mb in micro for t in mb.input_ids]
    assert rows == list(range(step.num_tokens))            # contiguous, in order, nothing lost
    sampled = [mb.input_ids[i] - 1 for mb in micro for i in mb.sample_indices]
    assert sampled == step.sample_indices                   # concatenated logits = the step's logits


def test_split_microbatch_logits_equal_whole_step(tmp_path):
    """Run the mixed step whole and as micro-batches through one runner: identical logits, in order."""
    cfg = ModelConfig.from_dict(hf_config(**WIDE))
    path = make_checkpoint(tmp_path, "w", WIDE)
    runner = ModelRunner(cfg, dtype=torch.float32, max_model_len=64, block_size=4)
    runner.load_weights(str(path), show_progress=False)
    runner.allocate_kv_cache(16)
    step = mixed_step(block_size=4)
    step.input_ids = [t % 384 for t in step.input_ids]
    whole = runner.execute(step)
    for parts in (2, 3, 4):
        parts_logits = torch.cat([runner.execute(mb) for mb in step.split(parts)])
        torch.testing.assert_close(parts_logits, whole, rtol=0, atol=1e-5)


def test_auto_microbatches_split_only_big_steps():
    small = mixed_step()                                    # 21 tokens
    assert microbatches(small, 1, None) == [small]
    assert microbatches(small, 2, None) == [small]          # memory-bound: kept whole
    assert len(microbatches(small, 2, 2)) == 2              # explicit: always split
    big = StepInput(input_ids=list(range(200)), positions=list(range(200)), slot_mapping=list(range(200)),
                    prefills=[(0, 100, 100, [0]), (100, 100, 100, [1])], sample_indices=[99, 199])
    assert len(microbatches(big, 2, None)) == 2             # compute-bound: one per stage


def test_assign_bundles_keeps_tp_groups_on_a_node():
    # SPREAD over two nodes alternates bundles; shards are regrouped so each stage's TP pair shares a node.
    node_of = {0: "A", 1: "B", 2: "A", 3: "B"}
    bundles = assign_bundles([0, 1, 2, 3], node_of, tp_size=2)
    assert bundles == [0, 2, 1, 3]
    assert [node_of[b] for b in bundles] == ["A", "A", "B", "B"]
    # borrowed bundles 1..4 of a replica's group keep their indices
    assert assign_bundles([1, 2, 3, 4], {1: "A", 2: "A", 3: "A", 4: "A"}, 2) == [1, 2, 3, 4]


# ---- one local Ray for the engine tests --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(240)
class TestOnLocalRay:
    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def ray_local(cls):
        os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
        init_local_ray(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1",
                       log_to_driver=False)
        yield
        ray.shutdown()

    def build(self, path, tp=1, pp=1, **kw) -> Engine:
        return Engine.from_pretrained(path, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                      resources_per_shard=SHARD, **{**SMALL, **kw})

    # use_compiled_graph: True = compiled graph; None = auto, which is plain actor calls on CPU shards.
    # num_microbatches: N = every step (decode included) in N micro-batches; None = auto (only big steps).
    @pytest.mark.parametrize("name, tp, pp, compiled, micro", [
        ("wide", 2, 1, True, None), ("wide", 4, 1, None, None), ("wide", 1, 2, True, 2), ("wide", 1, 3, None, 3),
        ("wide", 2, 2, True, 2), ("wide", 2, 2, None, None),
        ("narrow_kv", 4, 1, True, None),   # TP 4 > 2 kv heads: kv heads are replicated, not rejected
    ])
    def test_layouts_match_single_process(self, checkpoints, reference, name, tp, pp, compiled, micro):
        engine = self.build(checkpoints[name], tp, pp, use_compiled_graph=compiled, num_microbatches=micro)
        try:
            assert engine.executor.mode == ("compiled" if compiled else "tasks")
            round1, round2 = run_rounds(engine)
            stats = engine.executor.shard_stats()
        finally:
            engine.shutdown()
        (ref1, ref2), total_read = reference[name]
        assert_same(round1, ref1)
        assert_same(round2, ref2)
        assert sum(o.num_cached_tokens for o in round2) >= 32   # the prefix cache was used on the group
        assert sorted(s["rank"] for s in stats) == list(range(tp * pp))
        for s in stats:  # each shard read only its own slice from the safetensors files
            share = s["weight_bytes_read"] / total_read
            assert 0.75 / (tp * pp) <= share <= 1.25 / (tp * pp), (s["rank"], share)
            assert s["rss_bytes"] > 0 and s["weight_bytes"] > 0

    def test_explicit_layer_partition(self, checkpoints, reference):
        engine = self.build(checkpoints["wide"], 1, 2, pp_layer_partition=[4, 2])
        try:
            outs = engine.generate(ROUND1, GREEDY)
            stats = engine.executor.shard_stats()
        finally:
            engine.shutdown()
        assert_same(outs, reference["wide"][0][0])
        assert sorted(tuple(s["layers"]) for s in stats) == [(0, 4), (4, 6)]

    @pytest.mark.parametrize("compiled", [True, False])
    def test_pipeline_stages_overlap(self, checkpoints, compiled, monkeypatch):
        """Stage 0 computes micro-batch 1 while stage 1 computes micro-batch 0 (each compute stretched by
        0.2 s, so the shards' own timelines show the overlap whatever the machine's load)."""
        monkeypatch.setattr(RayExecutor, "worker_class", stretched_shard_worker(0.2))
        engine = self.build(checkpoints["wide"], 1, 2, use_compiled_graph=compiled, num_microbatches=2)
        try:
            engine.generate([[5, 6, 7], [8, 9, 10]], SamplingParams(max_tokens=1, ignore_eos=True))
            stage0, stage1 = engine.executor.timelines()
        finally:
            engine.shutdown()
        (a0, b0, _), (a1, b1, _) = stage0[-2:]
        (c0, d0, _), (c1, d1, _) = stage1[-2:]
        assert b0 - a0 >= 0.2 and d0 - c0 >= 0.2     # the stretched class is what ran
        assert a1 < d0 and c0 < b1        # stage 0 on micro-batch 1 while stage 1 is on micro-batch 0
        assert b0 <= c0                   # stage 1 started micro-batch 0 only once stage 0 handed it over

    @pytest.mark.parametrize("tp, pp, compiled", [(2, 1, True), (1, 2, False)])
    def test_killed_shard_fails_requests_and_health(self, checkpoints, tp, pp, compiled):
        engine = AsyncEngine.from_pretrained(checkpoints["wide"], tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                             resources_per_shard=SHARD, collective_timeout_s=20,
                                             use_compiled_graph=compiled, **SMALL)
        victim = engine.engine.executor.workers[-1]

        async def run():
            got = 0
            with pytest.raises(EngineUnavailableError) as failure:
                async for _ in engine.generate(list(range(5, 40)), SamplingParams(max_tokens=400, ignore_eos=True)):
                    got += 1
                    if got == 2:
                        ray.kill(victim, no_restart=True)
            return str(failure.value)

        try:
            # The death itself fails the step: the error says a shard died, not that the 20 s collective
            # timeout ran out (the 60 s wait_for is a guard against a hang, not a timing).
            message = asyncio.run(asyncio.wait_for(run(), 60))
            assert "timed out" not in message and ("died" in message or "closed" in message), message
            with pytest.raises(EngineUnavailableError):
                engine.check_health()
        finally:
            met_at = engine.engine.executor.init_method
            engine.shutdown()
        # the dead group's rendezvous file (one node here) is gone with it
        assert met_at.startswith("file://") and not os.path.exists(met_at[len("file://"):])
        # a fresh engine can be built afterwards (what a Serve replica restart does)
        fresh = self.build(checkpoints["wide"], tp, pp)
        try:
            assert len(fresh.generate([[5, 6, 7]], GREEDY)[0].token_ids) == 6
        finally:
            fresh.shutdown()

    @pytest.mark.parametrize("compiled", [True, False])
    def test_hung_shard_times_out(self, checkpoints, compiled):
        """A shard that stops answering (SIGSTOP) fails the step at the collective timeout, not never."""
        engine = self.build(checkpoints["wide"], 2, 1, collective_timeout_s=4, use_compiled_graph=compiled)
        pid = engine.executor.shard_stats()[1]["pid"]
        try:
            os.kill(pid, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(EngineUnavailableError, match="timed out|failed|died"):
                engine.generate([[5, 6, 7]], GREEDY)
            assert time.monotonic() - t0 < 60        # returns at all: a guard against a hang, not a timing
            with pytest.raises(EngineUnavailableError):
                engine.check_health()
        finally:
            os.kill(pid, signal.SIGCONT)
            engine.shutdown()

    def test_uses_the_callers_placement_group(self, checkpoints):
        """Inside a placement group (a Serve replica with placement_group_bundles), shards take bundles
        1..T·P of that group and no group is created or removed."""
        pg = placement_group([{"CPU": 0.2}] + [{"CPU": 0.3}] * 2)
        ray.get(pg.ready(), timeout=60)

        @ray.remote(num_cpus=0.2)
        class Replica:
            def run(self, path):
                engine = Engine.from_pretrained(path, tensor_parallel_size=2, use_compiled_graph=True, **SMALL)
                try:
                    placement = engine.executor.placement
                    out = engine.generate([[5, 6, 7]], GREEDY)[0].token_ids
                    return placement.group.id.hex(), placement.bundles, placement.owned, engine.executor.mode, out
                finally:
                    engine.shutdown()

        try:
            replica = Replica.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)).remote()
            before = len(placement_group_table())
            group_id, bundles, owned, mode, out = ray.get(replica.run.remote(str(checkpoints["wide"])), timeout=120)
            assert group_id == pg.id.hex() and sorted(bundles) == [1, 2] and not owned
            assert mode == "compiled"           # a compiled graph can be driven from inside an actor too
            assert len(placement_group_table()) == before
            assert len(out) == 6
            assert placement_group_table(pg)["state"] == "CREATED"   # still there: it is the caller's
        finally:
            remove_placement_group(pg)

    def test_bad_layouts_are_rejected_clearly(self, checkpoints):
        from workers.errors import CheckpointError
        with pytest.raises(CheckpointError, match="must divide num_attention_heads"):
            Engine.from_pretrained(checkpoints["wide"], tensor_parallel_size=3, resources_per_shard=SHARD)
        with pytest.raises(CheckpointError, match="pp_layer_partition"):
            Engine.from_pretrained(checkpoints["wide"], pipeline_parallel_size=2, pp_layer_partition=[5, 2],
                                   resources_per_shard=SHARD)

    def test_kv_cache_dtype_reaches_every_shard(self, checkpoints):
        """An fp8 KV cache on these CPU shards is refused by each shard's runner (it needs CUDA's Triton
        attention), which shows the setting reached them rather than being dropped on the way."""
        with pytest.raises(Exception, match="kv_cache_dtype fp8 needs the Triton attention"):
            self.build(checkpoints["wide"], tp=2, kv_cache_dtype="fp8")


# ---- two (simulated) nodes ----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(180)
class TestPlacementAcrossNodes:
    """Two raylets with 4 `fake_gpu` each stand in for two 4-GPU nodes."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def two_nodes(cls):
        from ray.cluster_utils import Cluster
        # (No node_ip_address here: a Cluster pinned to 127.0.0.1 never finds its GCS on this host.)
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, resources={"fake_gpu": 4}, include_dashboard=False))
        # Cluster records its address for address-less ray.init() calls; forget it so that no other test
        # process on this machine joins this cluster by accident.
        ray._common.utils.reset_ray_address()
        try:   # the cluster is ended even when a node fails to come up or the driver's shutdown fails
            cluster.add_node(num_cpus=1, resources={"fake_gpu": 4})
            ray.init(address=cluster.address, log_to_driver=False)
            yield cluster
        finally:
            try:
                ray.shutdown()
            finally:
                cluster.shutdown()

    @pytest.mark.parametrize("strategy", ["STRICT_PACK", "SPREAD"])
    def test_tp_group_packs_and_stages_spread(self, checkpoints, reference, strategy):
        # SPREAD is best effort: wait until the previous test's shards have handed their resources back.
        deadline = time.monotonic() + 30
        while ray.available_resources().get("fake_gpu", 0) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        engine = Engine.from_pretrained(checkpoints["wide"], tensor_parallel_size=2, pipeline_parallel_size=2,
                                        placement_strategy=strategy, resources_per_shard={"fake_gpu": 1, "CPU": 0.1},
                                        **SMALL)
        try:
            outs = engine.generate(ROUND1, GREEDY)
            stats = sorted(engine.executor.shard_stats(), key=lambda s: s["rank"])
        finally:
            engine.shutdown()
        assert_same(outs, reference["wide"][0][0])
        stage_nodes = [{s["node_id"] for s in stats if s["pp_rank"] == p} for p in (0, 1)]
        assert all(len(nodes) == 1 for nodes in stage_nodes)          # each TP group on one node
        if strategy == "STRICT_PACK":
            assert stage_nodes[0] == stage_nodes[1]                    # everything on one node
        else:
            assert stage_nodes[0] != stage_nodes[1]                    # stages on different nodes


def test_rendezvous_is_a_file_on_one_node_and_tcp_across_nodes():
    """One node: torch's FileStore (no TCPStore server listening on every interface); several: rank 0's node."""
    from workers.parallel.distributed import rendezvous

    one = rendezvous([("node-a", "10.0.0.1", 4000), ("node-a", "10.0.0.1", 4001)])
    assert one.startswith("file:///tmp/herd-rendezvous-") and one != rendezvous([("node-a", "10.0.0.1", 4000)])
    assert rendezvous([("node-a", "10.0.0.1", 4000), ("node-b", "10.0.0.2", 4001)]) == "tcp://10.0.0.1:4000"
