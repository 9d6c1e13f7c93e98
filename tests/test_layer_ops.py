"""The fused CPU layer ops (csrc/layer_ops_cpu.cpp) compute what the torch expressions compute."""
import pytest
import torch

from workers.cpu_kernels import cpu_kernel_module
from workers.layer_ops import CpuLayerOps, TorchLayerOps, select_layer_ops

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def fused():
    kernel = cpu_kernel_module()
    assert kernel is not None, "the CPU kernels must build on the CI machine (gcc + ninja are dependencies)"
    return CpuLayerOps(kernel)


def test_cpu_device_selects_the_fused_ops():
    assert isinstance(select_layer_ops(torch.device("cpu")), CpuLayerOps)


@pytest.mark.parametrize("dtype", list(TOL))
def test_rms_norm(fused, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 96, generator=g) * 3).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    out = fused.rms_norm(x, w, 1e-5)
    ref = TorchLayerOps.rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.allclose(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
def test_rotary_in_place_on_a_column_slice(fused, dtype):
    g = torch.Generator().manual_seed(1)
    heads, d, positions = 3, 16, torch.tensor([0, 5, 2, 99])
    fused_qkv = torch.randn(4, 3 * heads * d, generator=g).to(dtype)   # q | k | v, like the fused projection
    angles = torch.rand(128, d // 2, generator=g) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q = fused_qkv[:, : heads * d].view(4, heads, d)
    ref = TorchLayerOps.rotary(q.clone(), cos, sin, positions)
    untouched = fused_qkv[:, heads * d:].clone()
    out = fused.rotary(q, cos, sin, positions)
    assert torch.allclose(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(fused_qkv[:, heads * d:], untouched)   # only q's columns were rotated


@pytest.mark.parametrize("dtype", list(TOL))
def test_silu_mul(fused, dtype):
    g = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(9, 2 * 40, generator=g) * 4).to(dtype)
    out = fused.silu_mul(gate_up)
    ref = TorchLayerOps.silu_mul(gate_up)
    assert out.shape == (9, 40)
    assert torch.allclose(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])
