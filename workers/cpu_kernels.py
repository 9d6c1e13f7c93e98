"""herd's CPU kernels (workers/csrc/), compiled on first use into one extension module.

- paged_attention_cpu.cpp: decode attention reading the paged KV cache in place. On the CPU decode attention
  is memory-bound; the portable path gathers every sequence's keys and values into a padded copy each layer
  and reads it again in SDPA, the kernel reads each cache block once (~5x faster per layer here).
- layer_ops_cpu.cpp: RMSNorm, rotary embedding and SiLU-mul as single passes (each replaces 4-8 torch ops).

They are compiled with torch's cpp_extension (gcc + ninja) into ~/.cache/torch_extensions once per machine
(~30-60 s); if that is not possible the engine logs why and keeps the portable torch paths, which compute the
same thing. HERD_CPU_KERNELS=0 turns them off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

log = logging.getLogger(f"herd.{__name__}")
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "paged_attention_cpu.cpp", "layer_ops_cpu.cpp")]


def _build_digest() -> str:
    """torch rebuilds an extension when its sources or flags change, but looks neither at included headers
    nor at the CPU: a build cached by a machine with other instruction sets (-march=native) must not be
    loaded here. Both go into the flags through this digest."""
    h = hashlib.sha256()
    for header in sorted(_CSRC.glob("*.h")):
        h.update(header.read_bytes())
    h.update(platform.machine().encode())
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        h.update(flags.encode())
    except (OSError, StopIteration):
        pass
    return h.hexdigest()[:16]


_lock = threading.Lock()
_module = None
_failed: str | None = None


def cpu_kernel_module():
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
            log.info("loading herd's CPU kernels (compiled on first use, once per machine)...")
            flags = ["-O3", "-march=native", "-ffast-math", "-fno-strict-aliasing",
                     f"-DHERD_BUILD_DIGEST={_build_digest()}"]
            _module = load(name="herd_cpu_kernels", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                           verbose=False)
        except Exception as e:  # noqa: BLE001 - any build problem means: use the portable path
            _failed = f"{type(e).__name__}: {e}"
            log.warning("herd's CPU kernels are unavailable (%s); using the portable torch paths", _failed)
        return _module
