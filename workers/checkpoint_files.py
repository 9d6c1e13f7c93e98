"""Which file of a Hugging Face checkpoint folder holds what, found by name alone: nothing is opened and torch
is not imported, so a command can check a folder before it starts anything (cluster/preflight.py)."""
from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weights_source(path: str | Path) -> Path:
    """The file that says where `path`'s weights are: its safetensors index, or its one safetensors file
    (CheckpointError naming what is there instead)."""
    path = Path(path)
    for name in (INDEX_FILE, SINGLE_FILE):
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {', '.join(pickles)}: pickle checkpoints are never loaded; convert to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
