"""Typed errors of the engine.

Everything a client can cause is an `InvalidRequestError` (naming the offending field), so the
edge (gRPC / HTTP) can map it to INVALID_ARGUMENT / 400 without guessing from messages.
"""
from __future__ import annotations


class HerdError(Exception):
    """Base of every error herd raises on purpose."""


class InvalidRequestError(HerdError, ValueError):
    """The request itself is wrong; `field` names what (e.g. "temperature", "prompt")."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):
        # Pickled whole (the engine process sends its errors to the replica): the default would call
        # __init__ with the one formatted message.
        return (InvalidRequestError, (self.field, self.message))


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus at least one generated token) does not fit in max_model_len."""

    def __init__(self, prompt_len: int, max_model_len: int):
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len
        super().__init__(
            "prompt",
            f"prompt has {prompt_len} tokens but max_model_len is {max_model_len} "
            "(the prompt must leave room for at least one generated token)",
        )

    def __reduce__(self):
        return (PromptTooLongError, (self.prompt_len, self.max_model_len))


class QueueFullError(HerdError):
    """The engine already holds as many waiting requests as it is configured to queue."""


class EngineUnavailableError(HerdError):
    """The engine (or a shard of it) is dead or shutting down; the request cannot be served."""


class RequestFailedError(HerdError):
    """This request alone failed inside the engine (sampling, detokenizing, stop strings) and was aborted; the
    engine and every other request go on. The message names the stage, never internals (those are logged)."""


class CheckpointError(HerdError):
    """A checkpoint folder is missing files or has a config/weights herd cannot use."""


class SettingError(HerdError, ValueError):
    """A deployment setting this node cannot honour (e.g. engine_cpu_cores naming a CPU it does not have)."""


class TokenizerError(HerdError):
    """A tokenizer file could not be recognised or loaded."""
