"""What a local `herd serve` checks of each model's checkpoint before it starts Ray.

Without it, a wrong `path` or a layout the model cannot be split into showed only as replicas that failed to
start, one after another, until Serve gave up with a RuntimeError and a traceback (a minute later, with the
reason left in a replica's log file). Here each model's folder is checked the way its replicas will read it:
config.json parsed as a Llama config, the TP x PP layout split against it, the safetensors index or file and
the tokenizer file found. Only names and config.json are read (no weights, no torch), so it takes
milliseconds. A joined cluster (`herd serve --address`) is not checked: its models' paths are on its nodes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from workers.checkpoint_files import weights_source
from workers.config import ModelConfig
from workers.errors import CheckpointError, TokenizerError
from workers.shard import check_tensor_parallel, partition_layers
from workers.tokenizer import Tokenizer


def checkpoint_problems(models: Iterable[Any]) -> list[str]:
    """One line per model whose checkpoint its replicas could not load (`models`: a ClusterConfig's)."""
    problems = []
    for i, model in enumerate(models):
        try:
            check_checkpoint(model)
        except (CheckpointError, TokenizerError) as e:
            problems.append(f"models[{i}] ({model.name}): {e}")
    return problems


def check_checkpoint(model: Any) -> None:
    """Raise what loading `model` (a ModelSpec) would fail with first."""
    path = Path(model.path)
    if not path.is_dir():
        raise CheckpointError(f"path {model.path}: no such folder (a Hugging Face Llama checkpoint: config.json, "
                              "safetensors weights, a tokenizer)")
    cfg = ModelConfig.from_pretrained(path)
    check_tensor_parallel(cfg, model.tensor_parallel_size)
    partition_layers(cfg.num_hidden_layers, model.pipeline_parallel_size, model.pp_layer_partition)
    weights_source(path)
    Tokenizer.file_in(path)
