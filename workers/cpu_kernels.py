"""herd's CPU kernels (workers/csrc/), compiled on first use into one extension module.

- paged_attention_cpu.cpp: decode attention reading the paged KV cache in place. On the CPU decode attention
  is memory-bound; the portable path gathers every sequence's keys and values into a padded copy each layer
  and reads it again in SDPA, the kernel reads each cache block once (~5x faster per layer here).
- layer_ops_cpu.cpp: RMSNorm, rotary embedding and SiLU-mul as single passes (each replaces 4-8 torch ops).

They are compiled with torch's cpp_extension (gcc + ninja) once per machine and source version (~25 s on 2
vCPUs) into `<torch's extension root>/herd_cpu_kernels-<digest>` (`~/.cache/torch_extensions` unless
TORCH_EXTENSIONS_DIR says otherwise), from a copy of the sources kept there. Built from the checkout's own
paths, every checkout of the same sources (a CI clone, a second worktree) rebuilt the module for ~90 s and
made the next one rebuild again, as ninja compares the sources' paths. If compiling is not possible the
engine logs why and keeps the portable torch paths, which compute the same thing. HERD_CPU_KERNELS=0 turns
them off.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

log = logging.getLogger(f"herd.{__name__}")
_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("bindings.cpp", "paged_attention_cpu.cpp", "layer_ops_cpu.cpp")


def _csrc_files() -> dict[str, bytes]:
    """Every file of workers/csrc by name, read once: the digest and the build's copy come from the same bytes."""
    return {path.name: path.read_bytes() for path in sorted(_CSRC.iterdir()) if path.is_file()}


def _build_digest(files: dict[str, bytes]) -> str:
    """What the compiled module depends on besides torch's headers (which ninja tracks itself): every file of
    workers/csrc, the Python and torch versions, and the CPU. A build cached by a machine with other
    instruction sets (-march=native) must not be loaded here."""
    import sys

    import torch

    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + data + b"\0")
    h.update(f"{sys.version_info[:2]} {torch.__version__} {platform.machine()}".encode())
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        h.update(flags.encode())
    except (OSError, StopIteration):
        pass
    return h.hexdigest()[:16]


def _build_directory(digest: str, files: dict[str, bytes]) -> Path:
    """`<extension root>/herd_cpu_kernels-<digest>`, holding `files` (those the digest was taken of) in `src/`:
    the build reads that copy, so it does not depend on where this checkout is. The copy appears whole or not
    at all (written beside it, then renamed), so processes that start side by side (test workers, a group's
    shards) never build from half of it."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # as torch's own builds
    directory = Path(root) / f"herd_cpu_kernels-{digest}"
    src = directory / "src"
    if not src.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="src-", dir=directory))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        try:
            os.rename(staging, src)
        except OSError:  # another process put its copy there first: the same files
            shutil.rmtree(staging, ignore_errors=True)
    return directory


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """Hold `directory`'s build for this process, with a lock that the OS releases however its holder ends.

    torch's `load` takes its own lock, a `lock` file that it deletes when done, on every load (ninja then
    checks that the build is current). A process killed while it holds that file (a replica or a shard
    stopped during its start-up; a test's Ray ended) leaves it behind, and every later load on the machine
    waited for it forever: seen in a CI-like run, where one shard killed at a module's end hung every model
    that started after it. Every herd loader takes this flock first, so while one holds it no other live
    loader can be inside torch's lock, and a `lock` file found then is a dead process's: it is removed."""
    import fcntl

    with open(directory / "herd-build.lock", "a+") as held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process building or loading herd's CPU kernels in %s ...", directory)
            fcntl.flock(held, fcntl.LOCK_EX)
        try:
            stale = directory / "lock"
            if stale.exists():
                log.warning("removing %s, left by a process that ended while it loaded herd's CPU kernels", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


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
            log.info("loading herd's CPU kernels (compiled on first use, once per machine and source version)...")
            files = _csrc_files()
            directory = _build_directory(_build_digest(files), files)
            flags = ["-O3", "-march=native", "-ffast-math", "-fno-strict-aliasing"]
            with _build_lock(directory):
                _module = load(name="herd_cpu_kernels", sources=[str(directory / "src" / name) for name in _SOURCES],
                               extra_cflags=flags, build_directory=str(directory), verbose=False)
        except Exception as e:  # noqa: BLE001 - any build problem means: use the portable path
            _failed = f"{type(e).__name__}: {e}"
            log.warning("herd's CPU kernels are unavailable (%s); using the portable torch paths", _failed)
        return _module
