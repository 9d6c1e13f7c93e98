"""Continuous batching: which sequences run in the next step, and how many tokens each computes.

Every step is planned afresh (vLLM v1 style): running sequences first, each asking for its remaining
tokens (1 for a decode, the rest of its prompt for a prefill) within the step's token budget, then waiting
requests in arrival order (FCFS) while the budget, `max_num_seqs` and the KV pool allow. A prompt that
does not fit the budget is prefilled in chunks over several steps. When the pool runs dry, the most recently
arrived running sequence is preempted: its blocks are freed (they stay in the prefix cache) and it is
recomputed from the start of prompt + output when it next runs.
"""
from __future__ import annotations

import time

from collections import deque
from dataclasses import dataclass

from .kv_cache import KVCacheManager
from .sequence import Sequence, SeqStatus

# A sequence whose every prompt position's logits are kept (prompt_logprobs) prefills at most this many
# tokens a step: its logits are [tokens, vocab], 128 MiB of float32 at 256 tokens of a 128k vocabulary.
PROMPT_LOGITS_CHUNK = 256


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int          # tokens computed this step, starting at seq.num_computed

    @property
    def completes(self) -> bool:
        """Does this step bring the sequence up to date (so it samples its next token)?"""
        return self.seq.num_computed + self.num_new == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, front: bool = False) -> None:
        """Queue a sequence: last, or first (a request's other completions, which join it once its prompt is
        prefilled, so they run together and before the prompt's blocks can be evicted)."""
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._chunk(seq, seq.num_computed, budget)
            while not self.kv.allocate(seq.seq_id, seq.token_ids, seq.num_computed + num_new,
                                       salt=seq.cache_salt):
                victim = self.running.pop()  # the latest arrival gives way
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1

        # New work only joins when nothing had to be preempted this step (it would just thrash).
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # prompt_logprobs needs the logits of every prompt position, which a cached block does not keep.
            cached = [] if seq.wants_prompt_logits else self.kv.find_cached_prefix(seq.token_ids, seq.cache_salt)
            num_computed = len(cached) * self.kv.block_size
            num_new = self._chunk(seq, num_computed, budget)
            if not self.kv.allocate(seq.seq_id, seq.token_ids, num_computed + num_new, cached,
                                    salt=seq.cache_salt):
                break
            self.waiting.popleft()
            seq.num_computed = num_computed
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = min(num_computed, seq.num_prompt_tokens)
            if seq.first_scheduled_at is None:
                seq.first_scheduled_at = time.monotonic()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return SchedulerOutput(scheduled)

    @staticmethod
    def _chunk(seq: Sequence, num_computed: int, budget: int) -> int:
        """Tokens the sequence computes this step: what it lacks, within the budget (and PROMPT_LOGITS_CHUNK
        while its prompt's logits are kept)."""
        num_new = min(seq.num_tokens - num_computed, budget)
        return min(num_new, PROMPT_LOGITS_CHUNK) if seq.wants_prompt_logits else num_new

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and return its blocks to the pool."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
