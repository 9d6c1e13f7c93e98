"""The elementwise parts of a decoder layer as fused Triton kernels: the CUDA implementation of the
`TorchLayerOps` seam (layer_ops.py).

Each op is one pass over its rows where the torch expression is 4-8 kernels with temporaries: RMSNorm (and
RMSNorm of a residual sum, writing the sum too), rotary embedding in place on the q/k views of the fused
projection, SiLU(gate) * up. They round where the torch expressions round (an op on bf16 tensors rounds its
result to bf16), so a GPU model stays within a rounding of the portable path. Arithmetic runs in fp32 after
every load, which also keeps them correct under Triton's interpreter (it does no bf16 arithmetic), where
tests/test_triton_kernels.py runs them on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layer_ops import TorchLayerOps

SILU_BLOCK = 1024   # columns of the intermediate size per SiLU-mul program


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr):
    """fp32 x rounded to nearest even in DTYPE, as torch rounds. For bf16 the rounding is done on the bits:
    Triton's interpreter truncates fp32 -> bf16 casts where the GPU rounds; rounded first, the cast is exact
    on both."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to the model dtype and back, as a torch op on DTYPE tensors rounds its result."""
    return to_dtype(x, DTYPE).to(tl.float32)


@triton.jit
def _rms_norm_kernel(X, Delta, W, Out, Sum, stride_x, stride_d, stride_out, stride_sum, n, eps,
                     BLOCK: tl.constexpr, ADD: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    dtype = Out.dtype.element_ty
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if ADD:   # the residual stream: x + delta rounded as torch's add rounds it, then normalised
        x = _round(x + tl.load(Delta + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32), dtype)
        tl.store(Sum + row * stride_sum + cols, to_dtype(x, dtype), mask=ok)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    # As Hugging Face: normalise in fp32, round to the model dtype, then scale by the weight.
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_out + cols, to_dtype(w * _round(x * rstd, dtype), dtype), mask=ok)


@triton.jit
def _rotary_kernel(X, Cos, Sin, Positions, stride_xt, stride_xh, stride_cos, stride_sin, num_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token, all its heads: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) in place (rotate-half layout)."""
    t = tl.program_id(0)
    dtype = X.dtype.element_ty
    pos = tl.load(Positions + t)
    j = tl.arange(0, BLOCK_HALF)
    h = tl.arange(0, BLOCK_H)
    ok = (h[:, None] < num_heads) & (j[None, :] < HALF)
    c = tl.load(Cos + pos * stride_cos + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + pos * stride_sin + j, mask=j < HALF, other=0.0).to(tl.float32)[None, :]
    first = X + t * stride_xt + h[:, None] * stride_xh + j[None, :]
    x1 = tl.load(first, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=ok, other=0.0).to(tl.float32)
    r1 = _round(x1 * c, dtype) - _round(x2 * s, dtype)
    r2 = _round(x2 * c, dtype) + _round(x1 * s, dtype)
    tl.store(first, to_dtype(r1, dtype), mask=ok)
    tl.store(first + HALF, to_dtype(r2, dtype), mask=ok)


@triton.jit
def _silu_mul_kernel(GateUp, Out, stride_in, stride_out, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    dtype = Out.dtype.element_ty
    gate = tl.load(GateUp + row * stride_in + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_in + n + cols, mask=ok, other=0.0).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), dtype)     # F.silu rounds its result before the product
    tl.store(Out + row * stride_out + cols, to_dtype(silu * up, dtype), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last axis] with a contiguous last axis (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm of x (or of x + delta): (normed, the sum or None), both shaped like x."""
    rows = _rows(x)
    n = rows.shape[1]
    out = torch.empty_like(rows)
    total = torch.empty_like(rows) if delta is not None else None
    d = _rows(delta) if delta is not None else rows
    s = total if total is not None else out
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, d, weight, out, s, rows.stride(0), d.stride(0), out.stride(0),
                                           s.stride(0), n, eps, BLOCK=triton.next_power_of_2(n),
                                           ADD=delta is not None)
    return out.view(x.shape), (total.view(x.shape) if total is not None else None)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place (any token/head strides, contiguous last axis); cos/sin [max_pos, D/2]."""
    tokens, heads, head_dim = x.shape
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    if tokens:
        half = head_dim // 2
        _rotary_kernel[(tokens,)](x, cos, sin, positions, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
                                  heads, HALF=half, BLOCK_H=triton.next_power_of_2(heads),
                                  BLOCK_HALF=triton.next_power_of_2(half))
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] on the last axis."""
    rows = _rows(gate_up)
    n = rows.shape[1] // 2
    out = torch.empty((rows.shape[0], n), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0]:
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(n, SILU_BLOCK))](rows, out, rows.stride(0), out.stride(0), n,
                                                                       BLOCK=SILU_BLOCK)
    return out.view(*gate_up.shape[:-1], n)


class TritonLayerOps(TorchLayerOps):
    """The layer ops as fused Triton kernels (CUDA tensors; CPU ones only under TRITON_INTERPRET=1)."""

    def rms_norm(self, x, weight, eps):
        return rms_norm(x, weight, eps)[0]

    def add_rms_norm(self, x, delta, weight, eps):
        return rms_norm(x, weight, eps, delta=delta)

    def rotary(self, x, cos, sin, positions):
        if x.stride(-1) != 1:
            return super().rotary(x, cos, sin, positions)
        return rotary_(x, cos, sin, positions)   # in place: x is this step's own q/k

    def silu_mul(self, gate_up):
        return silu_mul(gate_up)
