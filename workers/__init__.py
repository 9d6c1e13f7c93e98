"""herd's inference engine for one model replica (no Serve, no gRPC here)."""
from .async_engine import AsyncEngine
from .config import ModelConfig
from .engine import Engine, EngineConfig, EngineStats, RequestOutput, StreamDelta
from .errors import (CheckpointError, EngineUnavailableError, HerdError, InvalidRequestError,
                     PromptTooLongError, QueueFullError, TokenizerError)
from .sampling import SamplingParams
from .tokenizer import Tokenizer

__all__ = [
    "AsyncEngine", "CheckpointError", "Engine", "EngineConfig", "EngineStats", "EngineUnavailableError",
    "HerdError", "InvalidRequestError", "ModelConfig", "PromptTooLongError", "QueueFullError", "RequestOutput",
    "SamplingParams", "StreamDelta", "Tokenizer", "TokenizerError",
]
