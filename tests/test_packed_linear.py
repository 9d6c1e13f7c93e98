"""CPU weight packing: packed weights give F.linear's results, the model packs its matmul weights after
loading, and HERD_PACK_WEIGHTS=0 keeps plain ones."""
import pytest
import torch
import torch.nn.functional as F

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
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
