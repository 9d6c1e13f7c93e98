"""Lazy safetensors access for Hugging Face checkpoints, one slice at a time.

A checkpoint is either one `model.safetensors` or several files listed by `model.safetensors.index.json`.
Tensors are read through `safe_open(...).get_slice(name)`, so a tensor-parallel rank reads only the rows or
columns it owns and never materialises the whole tensor. Pickle (`*.bin`, `*.pt`) is never loaded: a folder
that only has those is rejected with a clear error.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint_files import INDEX_FILE, weights_source
from .errors import CheckpointError


class WeightSource:
    """Maps tensor names to the safetensors file holding them and reads (slices of) tensors lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file_of: dict[str, Path] = self._index(self.path)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0  # what this process actually loaded (per-shard accounting)

    @staticmethod
    def _index(path: Path) -> dict[str, Path]:
        source = weights_source(path)
        if source.name == INDEX_FILE:
            weight_map = json.loads(source.read_text()).get("weight_map")
            if not weight_map:
                raise CheckpointError(f"{source}: no weight_map")
            return {name: path / fname for name, fname in weight_map.items()}
        with safe_open(source, framework="pt") as f:
            return {name: source for name in f.keys()}

    def _handle(self, name: str):
        try:
            file = self._file_of[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} missing from the checkpoint") from None
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in the index but missing")
            self._handles[file] = self._stack.enter_context(safe_open(file, framework="pt"))
        return self._handles[file]

    def get(self, name: str, dim: int | None = None, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The tensor `name`, or only rows/columns [start, end) along `dim` (read from disk as a slice)."""
        sl = self._handle(name).get_slice(name)
        if dim is None:
            t = sl[:]
        else:
            size = sl.get_shape()[dim]
            end = size if end is None else min(end, size)
            index = tuple([slice(None)] * dim + [slice(start, end)])
            t = sl[index]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
