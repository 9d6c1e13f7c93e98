"""The CPU paged-decode-attention kernel (workers/csrc/paged_attention_cpu.cpp), compiled on first use.

Decode attention on the CPU is memory-bound: the portable path gathers every sequence's keys and values
into a padded copy each layer, then reads it again in SDPA. The kernel reads the paged cache in place
(OpenMP over sequence × head, fp32 accumulation), ~4–10× faster per layer here. It is compiled with
torch's cpp_extension (gcc + ninja) into ~/.cache/torch_extensions once per machine (~30 s); if that is not
possible the engine logs why and keeps the portable path. HERD_CPU_KERNELS=0 turns it off.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.cpp"
_lock = threading.Lock()
_module = None
_failed: str | None = None


def paged_attention_module():
    """The compiled extension, or None (with the reason logged once) when it cannot be had."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        if os.environ.get("HERD_CPU_KERNELS", "1") == "0":
            _failed = "disabled by HERD_CPU_KERNELS=0"
            return None
        try:
            import ninja  # the pip package carries the binary; torch looks for it on PATH
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            from torch.utils.cpp_extension import load
            log.info("compiling the CPU paged-attention kernel (once per machine)...")
            _module = load(name="herd_paged_attention_cpu", sources=[str(_SOURCE)],
                           extra_cflags=["-O3", "-march=native", "-ffast-math", "-fno-strict-aliasing"], verbose=False)
        except Exception as e:  # noqa: BLE001 - any build problem means: use the portable path
            _failed = f"{type(e).__name__}: {e}"
            log.warning("CPU paged-attention kernel unavailable (%s); using the portable torch path", _failed)
        return _module
