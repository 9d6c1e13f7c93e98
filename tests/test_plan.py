"""`herd plan`: the memory arithmetic matches what the model really allocates, real shapes give the layouts
one expects (Llama 2 70B on 8×80 GiB: TP8 or TP4×PP2), and what cannot fit is refused with a reason."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from tests.checkpoints import make_checkpoint
from workers.config import ModelConfig
from workers.demo import hf_config
from workers.model import LlamaForCausalLM
from cluster.plan_cli import register_plan_cli
from workers.parallel.plan import (GiB, RUNTIME_OVERHEAD, SHAPES, min_gpus_needed, parse_size, plan, shape_config,
                                   shard_weight_bytes)
from workers.shard import ShardInfo, kv_block_bytes, partition_layers


def run_cli(argv, capsys):
    parser = argparse.ArgumentParser()
    register_plan_cli(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["plan", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def shards(cfg, tp, pp):
    for p, (start, end) in enumerate(partition_layers(cfg.num_hidden_layers, pp)):
        for t in range(tp):
            yield ShardInfo(tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, layer_start=start, layer_end=end)


@pytest.mark.parametrize("spec, layouts", [
    (dict(vocab_size=385, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=16,
          num_key_value_heads=4), [(1, 1), (2, 1), (4, 1), (8, 1), (2, 3), (1, 4)]),   # vocab padding, kv replication
    (dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
          num_key_value_heads=2, tie_word_embeddings=True), [(1, 1), (4, 1), (2, 2), (1, 2)]),
    (SHAPES["llama3-1b"][1], [(1, 1), (8, 1), (2, 2)]),
])
def test_weight_bytes_match_the_model(spec, layouts):
    """Per-shard arithmetic == the parameters LlamaForCausalLM allocates for that shard (on the meta device)."""
    cfg = ModelConfig.from_dict(spec if "torch_dtype" in spec else hf_config(**spec))
    for tp, pp in layouts:
        for shard in shards(cfg, tp, pp):
            model = LlamaForCausalLM(cfg, shard=shard, dtype=torch.bfloat16, device="meta", max_positions=8)
            assert shard_weight_bytes(cfg, shard, torch.bfloat16) == model.weight_bytes(), (tp, pp, shard)


@pytest.mark.parametrize("name, billions", [
    ("llama2-7b", 6.74), ("llama2-13b", 13.02), ("llama2-70b", 68.98),
    ("llama3-1b", 1.24), ("llama3-3b", 3.21), ("llama3-8b", 8.03), ("llama3-70b", 70.55),
])
def test_shapes_are_the_published_models(name, billions):
    _, cfg = shape_config(name)
    assert cfg.num_params / 1e9 == pytest.approx(billions, abs=0.01)
    assert shard_weight_bytes(cfg, ShardInfo(), torch.bfloat16) == 2 * cfg.num_params


def test_llama2_70b_on_8x80gib():
    _, cfg = shape_config("llama2-70b")
    layouts = plan(cfg, gpus_per_node=8, gpu_memory=80 * GiB, max_model_len=4096)
    fitting = {l.name: l for l in layouts if l.fits}
    assert layouts[0].name == "TP8"                      # recommended
    assert {"TP8", "TP4×PP2"} <= set(fitting)
    assert "TP1" not in fitting                          # 128 GiB of weights on one GPU
    for name in ("TP8", "TP4×PP2"):
        l = fitting[name]
        assert l.gpus == 8 and l.replicas == 1
        assert 15.5 * GiB < l.weight_bytes_per_gpu < 16.5 * GiB          # 137.9 GB / 8
        assert l.weight_bytes_per_gpu + l.kv_bytes_per_gpu + RUNTIME_OVERHEAD <= 0.9 * 80 * GiB
        # per-GPU KV per token: 80 layers / PP × (8 kv heads / TP) × 128 × 2 (K, V) × 2 bytes
        per_token = 80 // l.pp * (8 // l.tp) * 128 * 2 * 2
        assert l.kv_tokens * per_token <= l.kv_bytes_per_gpu
        assert l.max_seqs == l.kv_tokens // 4096 and l.max_seqs > 300


def test_kv_heads_per_rank_and_tp_within_a_node():
    """Llama 3 8B has 8 kv heads: a TP4 rank holds 2, a TP8 rank 1, so half the KV bytes per block; and TP
    never exceeds the GPUs of one node (PP crosses nodes instead)."""
    _, cfg = shape_config("llama3-8b")
    tp4 = next(shards(cfg, 4, 1))
    tp8 = next(shards(cfg, 8, 1))
    assert kv_block_bytes(cfg, tp4, 16, torch.bfloat16) == 2 * kv_block_bytes(cfg, tp8, 16, torch.bfloat16)
    _, cfg2 = shape_config("llama2-70b")
    assert all(l.tp <= 4 for l in plan(cfg2, gpus_per_node=4, gpu_memory=80 * GiB, nodes=2))


def test_nothing_fits_on_one_24gib_gpu(capsys):
    _, cfg = shape_config("llama2-70b")
    layouts = plan(cfg, gpus_per_node=1, gpu_memory=24 * GiB)
    assert layouts and not any(l.fits for l in layouts)
    need = min_gpus_needed(cfg, gpus_per_node=1, gpu_memory=24 * GiB, max_model_len=4096, dtype=torch.bfloat16)
    assert need is not None and need.gpus >= 6
    rc, out, err = run_cli(["--shape", "llama2-70b", "--gpus-per-node", "1", "--gpu-memory", "24GiB"], capsys)
    assert rc == 1 and out == ""
    assert "does not fit" in err and "128.5 GiB" in err and "smallest layout that fits" in err


def test_cli_table_and_json(capsys):
    rc, out, _ = run_cli(["--shape", "llama2-70b", "--gpus-per-node", "8", "--gpu-memory", "80GiB"], capsys)
    assert rc == 0
    assert "recommended: TP8 " in out and "TP4×PP2" in out and "weights/GPU" in out
    rc, out, _ = run_cli(["--shape", "llama3.1-70b", "--gpus-per-node", "8", "--gpu-memory", "80GiB",
                          "--nodes", "2", "--max-model-len", "8192", "--json"], capsys)
    data = json.loads(out)
    assert rc == 0 and data["gpus"] == 16 and data["recommended"] == "TP8×PP2"
    assert all(l["tp"] <= 8 for l in data["layouts"])


def test_cli_model_dir(tmp_path, capsys):
    spec = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, dtype="bfloat16")
    path = make_checkpoint(tmp_path, "m", spec)
    rc, out, _ = run_cli(["--model", str(path), "--gpus-per-node", "2", "--gpu-memory", "24GB"], capsys)
    assert rc == 0 and "TP2" in out and "bfloat16" in out


def test_cli_errors(capsys):
    rc, _, err = run_cli(["--gpus-per-node", "8", "--gpu-memory", "80GiB"], capsys)
    assert rc == 2 and "exactly one of" in err
    from workers.errors import CheckpointError
    with pytest.raises(CheckpointError, match="unknown shape"):
        run_cli(["--shape", "llama9-1t", "--gpus-per-node", "8", "--gpu-memory", "80GiB"], capsys)
    with pytest.raises(CheckpointError, match="size"):
        parse_size("lots")


@pytest.mark.parametrize("text, value", [("80GiB", 80 * GiB), ("80G", 80 * GiB), ("24GB", 24 * 10**9),
                                         ("40960MiB", 40 * GiB), ("1.5GiB", 3 * GiB // 2), ("1024", 1024)])
def test_parse_size(text, value):
    assert parse_size(text) == value
