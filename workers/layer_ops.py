"""The elementwise parts of a decoder layer: RMSNorm, rotary position embedding, SiLU(gate) * up.

`TorchLayerOps` writes them as torch expressions (any device; the same roundings as Hugging Face's eager
code). `CpuLayerOps` runs the same math as single fused passes from herd's CPU kernels
(csrc/layer_ops_cpu.cpp): in a decode step each of these is a handful of small torch ops whose dispatch and
temporaries cost more than the arithmetic. On CUDA `TritonLayerOps` (triton_layer_ops.py) runs them as fused
Triton kernels, the residual add folded into the RMSNorm that follows it; HERD_TRITON_LAYER_OPS=0 keeps the
torch expressions there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import triton_enabled


class TorchLayerOps:
    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # As Hugging Face: normalise in fp32, cast back, then scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and the RMSNorm after it: (rms_norm(x + delta), x + delta)."""
        x = x + delta
        return self.rms_norm(x, weight, eps), x

    @staticmethod
    def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [T, H, D] -> rotated (rotate-half layout); cos/sin: [max_positions, D/2] tables."""
        c = cos[positions].unsqueeze(1)
        s = sin[positions].unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


class CpuLayerOps(TorchLayerOps):
    """The fused CPU kernels (CPU tensors only: select_layer_ops picks this class for the CPU). Rotary falls
    back to the torch expression for a q/k whose heads are not contiguous within a token."""

    def __init__(self, kernel):
        self.kernel = kernel

    def rms_norm(self, x, weight, eps):
        return self.kernel.rms_norm(x, weight, eps)

    def rotary(self, x, cos, sin, positions):
        if x.stride(-1) != 1 or x.stride(-2) != x.shape[-1]:
            return super().rotary(x, cos, sin, positions)
        self.kernel.rotary_(x, cos, sin, positions)  # in place: x is this step's own q/k
        return x

    def silu_mul(self, gate_up):
        return self.kernel.silu_mul(gate_up)


def select_layer_ops(device: torch.device) -> TorchLayerOps:
    """The fused kernels for `device` (Triton on CUDA, herd's compiled kernels on the CPU), else the torch
    expressions."""
    if device.type == "cuda" and triton_enabled("HERD_TRITON_LAYER_OPS"):
        from .triton_layer_ops import TritonLayerOps
        return TritonLayerOps()
    if device.type == "cpu":
        from .cpu_kernels import cpu_kernel_module
        kernel = cpu_kernel_module()
        if kernel is not None:
            return CpuLayerOps(kernel)
    return TorchLayerOps()
