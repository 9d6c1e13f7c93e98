"""herd's inference engine for one model replica (no Serve, no gRPC here).

The names below are imported on first use (a module `__getattr__`), so that importing a light module of
this package (workers.config, workers.errors, workers.parallel.plan) does not import torch: `herd plan`,
`herd client` and `herd --help` start in a fraction of a second.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncEngine": "async_engine", "ModelConfig": "config",
    "Engine": "engine", "EngineConfig": "engine_config", "EngineStats": "engine", "RequestOutput": "engine",
    "StreamDelta": "engine", "CompletionOutput": "engine",
    "CheckpointError": "errors", "EngineUnavailableError": "errors", "HerdError": "errors",
    "InvalidRequestError": "errors", "PromptTooLongError": "errors", "QueueFullError": "errors",
    "TokenizerError": "errors",
    "SamplingParams": "sampling", "Tokenizer": "tokenizer",
    "StructuredOutputs": "structured_output", "validate_structured": "structured_output",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value              # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

