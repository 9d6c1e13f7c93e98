"""One request's life inside the engine: its tokens, progress through the KV cache, and output state."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling import SamplingParams, SamplingState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    status: SeqStatus = SeqStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0        # tokens whose k/v are in the cache
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache (set when first scheduled)
    finish_reason: str | None = None
    sampling: SamplingState | None = None
    cache_salt: int = 0          # prefix-cache partition: blocks are only shared between equal salts
    index: int = 0               # which of the request's n completions this is
    # Every prompt position's logits are wanted (prompt_logprobs): computed, not taken from the prefix cache.
    wants_prompt_logits: bool = False
    first_scheduled_at: float | None = None  # time.monotonic() when it first left the waiting queue

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)  # prompt + output, the sequence as the model sees it
        if self.sampling is None:
            self.sampling = SamplingState.create(self.params, self.prompt_token_ids, seed_offset=self.index)

    @property
    def seq_id(self) -> str:
        """The key of this sequence's KV blocks: the request id for the first completion, and a suffix no
        client id can take (a NUL) for its siblings."""
        return self.request_id if self.index == 0 else f"{self.request_id}\x00{self.index}"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        self.sampling.output_token_ids.append(token_id)

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
