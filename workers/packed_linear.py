"""Linear-layer weights packed once for the CPU's matmul kernels.

Given a plain `[out, in]` weight, torch's CPU `F.linear` lets oneDNN re-lay it out into the blocked format its
AVX-512 / AMX kernels read, on every call. For decode-sized batches that re-layout costs as much as the
matmul itself. Packing each weight once after loading (`mkldnn._reorder_linear_weight`) and calling oneDNN's
linear on the packed tensor removes that cost: decode-sized matmuls get faster, large prefill batches stay
about the same (figures: docs/benchmarks.md). Results are the same values (bf16 bit-identical, fp32 within
float rounding).

Only float32 / bfloat16 weights on CPU are packed, and only after a one-row self-check against `F.linear`
passes (a CPU or build without the needed oneDNN kernels keeps the plain weight). GPUs never take this path.
HERD_PACK_WEIGHTS=0 turns it off.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(f"herd.{__name__}")
_PACKABLE = (torch.float32, torch.bfloat16)
_warned = False


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight packed for oneDNN, or the weight itself where packing does not apply or fails its check."""
    global _warned
    if (weight.device.type != "cpu" or weight.dtype not in _PACKABLE or weight.dim() != 2
            or os.environ.get("HERD_PACK_WEIGHTS", "1") == "0" or not torch.backends.mkldnn.is_available()):
        return weight
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        probe = torch.linspace(-1, 1, weight.shape[1], dtype=weight.dtype).unsqueeze(0)  # no global RNG use
        ok = torch.allclose(_packed_linear(probe, packed).float(), F.linear(probe, weight).float(),
                            rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError) as e:
        ok = False
        reason = f"{type(e).__name__}: {e}"
    else:
        reason = "packed result differs from F.linear"
    if not ok:
        if not _warned:
            log.warning("CPU weight packing unavailable (%s); using plain F.linear", reason)
            _warned = True
        return weight
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a plain or a packed weight."""
    if weight.layout == torch._mkldnn:
        return _packed_linear(x.contiguous(), weight)
    return F.linear(x, weight)


def pack_module_weights(module: nn.Module, names: list[str]) -> None:
    """Replace the named weight Parameters of `module` by packed tensors (buffers), freeing the plain ones."""
    for name in names:
        plain = getattr(module, name).data    # (`.data` is a new tensor object at every access)
        packed = pack_weight(plain)
        if packed is not plain:
            delattr(module, name)
            module.register_buffer(name, packed, persistent=False)
