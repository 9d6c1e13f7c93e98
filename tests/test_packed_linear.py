"""CPU weight packing: packed weights give F.linear's results, the model packs its matmul weights after
loading, and HERD_PACK_WEIGHTS=0 keeps plain ones."""
import pytest
import torch
import torch.nn.functional as F

from tests.checkpoints import LLAMA2_MHA, LLAMA3_GQA_TIED, make_checkpoint
from workers.packed_linear import linear, pack_weight


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.0)])
@pytest.mark.parametrize("rows", [1, 7, 48, 300])
def test_packed_weight_matches_f_linear(dtype, tol, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g).to(dtype)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    packed = pack_weight(w)
    if dtype == torch.float32:
        assert packed.layout == torch._mkldnn, "fp32 packing must be available on every x86 CPU"
    ref = F.linear(x, w).float()
    assert torch.allclose(linear(x, packed).float(), ref, rtol=tol, atol=tol)
    # A non-contiguous input (a column slice) is accepted too.
    wide = torch.randn(rows, 128, generator=g).to(dtype)
    assert torch.allclose(linear(wide[:, ::2], packed).float(), F.linear(wide[:, ::2], w).float(), rtol=tol, atol=tol)


def test_packing_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("HERD_PACK_WEIGHTS", "0")
    w = torch.randn(8, 8)
    assert pack_weight(w) is w


def test_engine_packs_its_weights_and_counts_them(tmp_path):
    from workers import Engine
    engine = Engine.from_pretrained(make_checkpoint(tmp_path, "mha", LLAMA2_MHA), show_progress=False)
    try:
        model = engine.executor.runner.model
        assert model.layers[0].qkv.layout == torch._mkldnn
        assert model.lm_head.layout == torch._mkldnn
        plain = sum(p.numel() * p.element_size() for p in model.parameters())
        assert model.weight_bytes() > plain  # packed buffers are counted, not dropped
    finally:
        engine.shutdown()


def test_a_tied_lm_head_gets_a_packed_copy_and_the_lookup_keeps_the_plain_rows(tmp_path, monkeypatch):
    from workers import Engine, SamplingParams
    path = make_checkpoint(tmp_path, "tied", LLAMA3_GQA_TIED)
    prompts, greedy = [[1, 5, 9, 200, 33], [7, 7, 420]], SamplingParams(max_tokens=8, temperature=0.0)
    engine = Engine.from_pretrained(path, show_progress=False)
    try:
        model = engine.executor.runner.model
        assert model.lm_head.layout == torch._mkldnn and model.embed.layout == torch.strided
        assert isinstance(model.embed, torch.nn.Parameter) and "lm_head" not in dict(model.named_parameters())
        h = torch.randn(5, model.cfg.hidden_size)
        assert torch.allclose(linear(h, model.lm_head), F.linear(h, model.embed), rtol=1e-5, atol=1e-5)
        assert model.weight_bytes() >= 2 * model.embed.numel() * model.embed.element_size()   # the copy counts
        packed_tokens = [o.token_ids for o in engine.generate(prompts, greedy)]
    finally:
        engine.shutdown()
    monkeypatch.setenv("HERD_PACK_WEIGHTS", "0")
    plain = Engine.from_pretrained(path, show_progress=False)
    try:
        assert plain.executor.runner.model.lm_head is plain.executor.runner.model.embed   # one tensor, as before
        assert [o.token_ids for o in plain.generate(prompts, greedy)] == packed_tokens
    finally:
        plain.shutdown()


def test_a_last_pipeline_stage_with_a_tied_head_keeps_only_the_packed_copy():
    from workers.config import ModelConfig
    from workers.model import LlamaForCausalLM
    from workers.shard import ShardInfo
    cfg = ModelConfig.from_dict(dict(LLAMA3_GQA_TIED, architectures=["LlamaForCausalLM"]))
    last = LlamaForCausalLM(cfg, shard=ShardInfo(pp_rank=1, pp_size=2, layer_start=2, layer_end=3))
    first = LlamaForCausalLM(cfg, shard=ShardInfo(pp_rank=0, pp_size=2, layer_start=0, layer_end=2))
    for model in (last, first):
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    reference = last.embed.detach().clone()
    last.pack_weights_for_cpu()
    first.pack_weights_for_cpu()
    assert last.embed is None and last.lm_head.layout == torch._mkldnn   # nothing on this stage looks tokens up
    h = torch.randn(3, cfg.hidden_size)
    assert torch.allclose(linear(h, last.lm_head), F.linear(h, reference), rtol=1e-5, atol=1e-5)
    assert first.lm_head is None and first.embed.layout == torch.strided  # the first stage has no head
