"""What a local `herd serve` checks before it starts Ray: each model's checkpoint, and its gRPC / HTTP ports.

Without it, a wrong `path` or a layout the model cannot be split into showed only as replicas that failed to
start, one after another, until Serve gave up with a RuntimeError and a traceback (a minute later, with the
reason left in a replica's log file). Here each model's folder is checked the way its replicas will read it:
config.json parsed as a Llama config, the TP x PP layout split against it, the safetensors index or file and
the tokenizer file found. Only names and config.json are read (no weights, no torch), so it takes
milliseconds. A joined cluster (`herd serve --address`) is not checked: its models' paths are on its nodes.

A gRPC or HTTP port that something else already holds (another `herd serve`, say) failed the same way: Serve's
proxy raised "Failed to bind" with a traceback after Ray had started. `port_problems` tries each port first.
"""
from __future__ import annotations

import errno
import socket
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


def port_problems(host: str, ports: dict[str, int]) -> list[str]:
    """One line per port of `ports` ({"grpc_port": 9000, ...}) that cannot be listened on at `host` now.

    The probe sets SO_REUSEADDR as the proxies do, so a port left in TIME_WAIT by a server that just stopped
    passes, and not SO_REUSEPORT, so a port another live server holds fails even when that server shares it
    (grpc's servers set SO_REUSEPORT: a second herd serve's gRPC proxy would bind beside the first's and take
    a share of its connections)."""
    problems = []
    for key, port in ports.items():
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
                probe.listen(1)
        except OSError as e:
            why = "in use (by another herd serve?)" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            problems.append(f"{key}: cannot listen on {host}:{port}: {why}")
    return problems
