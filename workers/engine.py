"""The engine core: requests in, tokens out, one continuous-batching step at a time.

`Engine` owns the scheduler, the KV block bookkeeping, sampling and detokenization; the forward pass runs in
an `Executor` (this process, or a TP×PP group of Ray shard workers). `Engine.generate` is the offline,
batch API; `AsyncEngine` (async_engine.py) drives the same core from a background thread for serving.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence as Seq

import torch

from .config import ModelConfig, parse_dtype
from .errors import (CheckpointError, HerdError, InvalidRequestError, PromptTooLongError, QueueFullError,
                     RequestFailedError)
from .engine_config import EngineConfig
from .executor import Executor, LocalExecutor, default_device
from .kv_cache import KVCacheManager
from .model_runner import StepInput
from .sampling import SampleResult, Sampler, SamplingParams, SamplingState
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence
from .stop_strings import StopStringMatcher
from .structured_output import GrammarCompiler
from .tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(f"herd.{__name__}")


# EngineConfig lives in its own light module (pydantic only): the cluster config, the chart schema and the CLI
# flags derive from its fields without importing torch.


def validate_request(prompt_token_ids: Seq[int], params: SamplingParams, *, vocab_size: int, max_model_len: int,
                     has_tokenizer: bool) -> None:
    """Raise the InvalidRequestError a request would get from this engine, without the engine: what a caller
    in another process than the engine (workers.engine_process) checks before sending it."""
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError("sampling_params", "must be a SamplingParams")
    if len(prompt_token_ids) == 0:
        raise InvalidRequestError("prompt", "must not be empty")
    vocab = vocab_size
    for t in prompt_token_ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise InvalidRequestError("prompt_token_ids", f"token id {t!r} is outside the vocabulary [0, {vocab})")
    if len(prompt_token_ids) >= max_model_len:
        raise PromptTooLongError(len(prompt_token_ids), max_model_len)
    for t in params.stop_token_ids:  # SamplingParams checked the type and sign; only we know the vocabulary
        if t >= vocab:
            raise InvalidRequestError("stop_token_ids", f"token id {t} is outside the vocabulary [0, {vocab})")
    for t in params.logit_bias:
        if t >= vocab:
            raise InvalidRequestError("logit_bias", f"token id {t} is outside the vocabulary [0, {vocab})")
    if params.structured is not None and not has_tokenizer:
        raise InvalidRequestError("structured", "this model has no tokenizer, which a grammar needs")


@dataclass
class StreamDelta:
    """What one request gained in one step (the unit AsyncEngine streams)."""
    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    # Set (with finish_reason "error") when this request alone failed and was aborted; the engine goes on.
    error: HerdError | None = None
    index: int = 0  # which of the request's n completions these tokens belong to
    # Per prompt token (the first has None): {token: logprob} of the actual token and the top-N. Only on the
    # request's first delta, and only when SamplingParams.prompt_logprobs asked for it.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # time.monotonic() when the engine first scheduled this completion (queue wait ends): on its first delta.
    scheduled_at: float | None = None

    @property
    def finished(self) -> bool:
        """This completion is finished (a request with n > 1 is finished when all n are)."""
        return self.finish_reason is not None

    @staticmethod
    def merged(deltas: Seq["StreamDelta"]) -> "StreamDelta":
        """One delta holding consecutive `deltas` of one completion (none failed), built in one pass: merged
        pairwise, a backlog of k deltas (a client that stopped reading) copied O(k^2) tokens."""
        first, last = deltas[0], deltas[-1]
        for later in deltas[1:]:
            if later.index != first.index or later.request_id != first.request_id:
                raise ValueError(f"cannot merge completion {later.index} of {later.request_id!r} into completion "
                                 f"{first.index} of {first.request_id!r}")
        if len(deltas) == 1:
            return first
        logprobs = None
        if any(d.logprobs is not None for d in deltas):
            logprobs = [entry for d in deltas for entry in d.logprobs or ()]
        prompt_logprobs = next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None)
        scheduled_at = next((d.scheduled_at for d in deltas if d.scheduled_at is not None), None)
        return StreamDelta(first.request_id, [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas),
                           logprobs, last.finish_reason, last.num_prompt_tokens, last.num_cached_tokens,
                           index=first.index, prompt_logprobs=prompt_logprobs, scheduled_at=scheduled_at)


@dataclass
class CompletionOutput:
    """One of a request's n completions."""
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None

    def add(self, d: StreamDelta) -> None:
        self.token_ids += d.token_ids
        self.text += d.text
        if d.logprobs is not None:
            self.logprobs = (self.logprobs or []) + d.logprobs
        self.finish_reason = d.finish_reason


@dataclass
class RequestOutput:
    """A request's result. The top-level token_ids / text / finish_reason / logprobs are completion 0's;
    `completions` holds all n (n = SamplingParams.n), in index order."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] | None = None
    num_cached_tokens: int = 0
    error: HerdError | None = None  # why finish_reason is "error"
    completions: list[CompletionOutput] = field(default_factory=list)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    def add(self, d: StreamDelta) -> None:
        while len(self.completions) <= d.index:
            self.completions.append(CompletionOutput(len(self.completions)))
        self.completions[d.index].add(d)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        if d.index == 0:
            self.token_ids += d.token_ids
            self.text += d.text
            if d.logprobs is not None:
                self.logprobs = (self.logprobs or []) + d.logprobs
            self.finish_reason = d.finish_reason
            self.num_cached_tokens = d.num_cached_tokens
        if d.error is not None:  # a failure ends the whole request, whichever completion it came from
            self.error, self.finish_reason = d.error, "error"


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    prefix_cache_hit_tokens: int   # cumulative
    prompt_tokens: int             # cumulative
    generation_tokens: int         # cumulative
    num_preemptions: int           # cumulative
    # Prompt tokens whose k/v were computed (not taken from the prefix cache), recomputation included.
    prompt_tokens_computed: int = 0  # cumulative

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free


class _Completion:
    """Engine-side state of one completion beyond what the scheduler tracks: detokenizer and stream position."""

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer | None):
        self.seq = seq
        self.detok = detok
        # Stop strings only apply to text, so a model without a tokenizer never needs a matcher.
        self.stops = StopStringMatcher(seq.params.stop) if detok is not None and seq.params.stop else None
        # The text not streamed yet (a stop string's possible start waits here), after streamed_chars
        # characters that were: the whole text is never kept, as appending each token's text to it copied it
        # every step (~50 us a step for a 100k-token answer, per sequence).
        self.unsent = ""
        self.streamed_chars = 0
        self.streamed_tokens = 0
        self.pending_logprobs: list[dict[int, float]] = []
        self.scheduled_at_sent = False  # the first-scheduled time goes out once, on the first delta after it


class _Request:
    """A request: its n completions (n sequences of one prompt), its grammar while it compiles, and its
    prompt logprobs while they are computed.

    Only completion 0 is scheduled at first; the others (`held`) join the queue once its prefill is done,
    so they find the whole prompt in the prefix cache and compute at most one block of it each."""

    def __init__(self, request_id: str, completions: list[_Completion]):
        self.request_id = request_id
        self.completions = completions
        self.params = completions[0].seq.params
        self.unfinished = len(completions)
        self.held: list[Sequence] = [c.seq for c in completions[1:]]
        self.grammar: concurrent.futures.Future | None = None
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.prompt_logprobs_sent = False
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has nothing before it
            first = completions[0].seq
            first.wants_prompt_logits = first.num_prompt_tokens > 1

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.completions]


class Engine:
    def __init__(self, model_config: ModelConfig, executor: Executor, tokenizer: Tokenizer | None,
                 config: EngineConfig, max_model_len: int):
        self.model_config = model_config
        self.executor = executor
        self.tokenizer = tokenizer
        self.config = config
        self.max_model_len = max_model_len
        self.block_size = config.block_size
        self.kv = KVCacheManager(executor.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.sampler = Sampler()
        self._requests: dict[str, _Request] = {}
        self._compiling: dict[str, _Request] = {}  # requests whose grammar is not compiled yet (not queued)
        self._ids = itertools.count()
        self._eos_ids = frozenset(model_config.eos_token_ids) | (tokenizer.stop_ids if tokenizer else frozenset())
        self._counters = {"prefix_cache_hit_tokens": 0, "prompt_tokens": 0, "generation_tokens": 0,
                          "prompt_tokens_computed": 0}
        self._grammars: GrammarCompiler | None = None  # made at the first constrained request

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, *, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                        dtype: str | torch.dtype | None = None, **engine_args) -> "Engine":
        path = str(path)
        model_config = ModelConfig.from_pretrained(path)
        config = EngineConfig.from_kwargs(**engine_args)
        tokenizer = _find_tokenizer(path)
        torch_dtype = resolve_dtype(dtype, model_config)
        wanted_len = config.max_model_len or model_config.max_position_embeddings
        if tensor_parallel_size * pipeline_parallel_size > 1:
            from .parallel import RayExecutor  # imports Ray only when a shard group is asked for
            executor: Executor = RayExecutor(path, model_config, tensor_parallel_size=tensor_parallel_size,
                                             pipeline_parallel_size=pipeline_parallel_size, dtype=torch_dtype,
                                             max_model_len=wanted_len, engine_config=config)
        else:
            executor = LocalExecutor(path, model_config, dtype=torch_dtype, max_model_len=wanted_len,
                                     block_size=config.block_size, budget=config.cache_budget(),
                                     show_progress=config.show_progress, kv_cache_dtype=config.kv_cache_dtype)
        capacity = executor.num_blocks * config.block_size
        if capacity < wanted_len:
            if config.max_model_len is not None:
                executor.shutdown()
                raise CheckpointError(
                    f"max_model_len {wanted_len} does not fit the KV cache ({capacity} tokens); "
                    "raise kv_cache_memory / gpu_memory_utilization or lower max_model_len")
            log.warning("max_model_len capped to %d tokens (what the KV cache holds)", capacity)
            wanted_len = capacity
        return cls(model_config, executor, tokenizer, config, wanted_len)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # ---- requests --------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "must not be empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt", "this model has no tokenizer; send token ids")
            return self.tokenizer.encode(prompt, bos=True)
        return list(prompt)

    def validate(self, prompt_token_ids: Seq[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                         has_tokenizer=self.tokenizer is not None)

    def add_request(self, prompt: str | Seq[int], params: SamplingParams, request_id: str | None = None, *,
                    cache_salt: int = 0) -> str:
        """Queue a request; returns its id. `cache_salt` partitions the prefix cache: a request only reuses
        KV blocks computed under the same salt (e.g. one per tenant), so no tenant can probe another's
        prompts by timing. 0 is the shared, unsalted cache.

        max_tokens may ask for more than the prompt leaves of max_model_len (or be None: until the context
        ends): generation then stops at max_model_len with finish_reason "length" (as vLLM does), rather than
        refusing the request. With params.n > 1 the request has n completions (StreamDelta.index); a
        grammar (params.structured) is compiled off this thread first, and a bad one fails the request with
        its InvalidRequestError delta."""
        token_ids = self.encode_prompt(prompt)
        self.validate(token_ids, params)
        if not isinstance(cache_salt, int) or isinstance(cache_salt, bool):
            raise InvalidRequestError("cache_salt", f"must be an integer, got {cache_salt!r}")
        limit = self.config.max_queued_requests
        if limit is not None and self._num_queued() >= limit:
            raise QueueFullError(f"{self._num_queued()} sequences already waiting (max_queued_requests={limit}; a "
                                 "request of n completions counts n)")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in flight")
        completions = []
        for i in range(params.n):
            seq = Sequence(request_id, token_ids, params, cache_salt=cache_salt, index=i)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids) if self.tokenizer else None
            completions.append(_Completion(seq, detok))
        req = _Request(request_id, completions)
        self._requests[request_id] = req
        if params.structured is not None:
            # Compiled on the compiler's thread; the request joins the queue when its grammar is ready.
            req.grammar = self._grammar_compiler().compile(params.structured)
            self._compiling[request_id] = req
        else:
            self.scheduler.add(completions[0].seq)
        return request_id

    def _grammar_compiler(self) -> GrammarCompiler:
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self._eos_ids))
        return self._grammars

    def abort(self, request_id: str) -> StreamDelta | None:
        """Abort every completion of the request; returns completion 0's final delta (None if unknown).
        `abort_request` returns all of them."""
        deltas = self.abort_request(request_id)
        return deltas[0] if deltas else None

    def abort_request(self, request_id: str) -> list[StreamDelta]:
        """Abort every completion of the request; the final "abort" delta of each one still unfinished."""
        req = self._requests.pop(request_id, None)
        self._compiling.pop(request_id, None)
        if req is None:
            return []
        deltas = []
        for comp in req.completions:
            if comp.seq.finished:
                continue
            self.scheduler.finish(comp.seq)
            comp.seq.finish_reason = "abort"
            deltas.append(self._delta(req, comp, final=True))
        return deltas

    def _num_queued(self) -> int:
        """Waiting requests beyond the running batch's free seats: those the next step will admit (they only
        arrived between two steps) are not queued, so a burst that fits the batch is never refused."""
        free_seats = max(0, self.scheduler.max_num_seqs - len(self.scheduler.running))
        return max(0, len(self.scheduler.waiting) + len(self._compiling) - free_seats)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        deltas = self._start_compiled()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return deltas
        batch = sorted(out.scheduled, key=lambda s: s.num_new != 1)  # decodes first, then prefill chunks
        step, sampled, prompt_rows = self._build_step(batch)
        # An executor failure (a dead shard, a broken device) propagates: it is the whole engine's, not a
        # request's. What follows is per request, and a failure there ends that request only.
        logits = self.executor.execute(step) if step.num_tokens else None
        if prompt_rows:
            deltas += self._collect_prompt_logprobs(logits, prompt_rows)
            # Only the sampling rows go on (of requests that are still there: collecting may fail one).
            sampled = [(row, s) for row, s in sampled if s.seq.request_id in self._requests]
            logits = logits[torch.tensor([row for row, _ in sampled], dtype=torch.long)] if sampled else None
        sampled = [s for _, s in sampled]
        results = self._sample(logits, [s.seq.sampling for s in sampled]) if sampled else []
        for s in batch:
            prompt_left = s.seq.num_prompt_tokens - s.seq.num_computed
            self._counters["prompt_tokens_computed"] += max(0, min(s.num_new, prompt_left))
            s.seq.num_computed += s.num_new
        for s, result in zip(sampled, results):
            req = self._requests.get(s.seq.request_id)
            if req is None:
                continue
            comp = req.completions[s.seq.index]
            if isinstance(result, Exception):
                delta = self._fail(req, "sampling", result)
            else:
                try:
                    delta = self._on_token(req, comp, result.token_id, result.logprobs)
                except Exception as e:  # detokenizing, stop strings, the grammar: this request's own data
                    delta = self._fail(req, "post-processing", e)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def _start_compiled(self) -> list[StreamDelta]:
        """Queue the requests whose grammar has compiled; fail those whose grammar did not. When nothing else
        can run, wait a little for a compilation rather than spin."""
        if not self._compiling:
            return []
        if not self.scheduler.has_work():
            concurrent.futures.wait([r.grammar for r in self._compiling.values()], timeout=0.05,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        deltas = []
        for rid, req in list(self._compiling.items()):
            if not req.grammar.done():
                continue
            del self._compiling[rid]
            try:
                compiled = req.grammar.result()
            except HerdError as e:     # InvalidRequestError: the client's grammar
                deltas.append(self._fail(req, "grammar compilation", e, public=e))
                continue
            except Exception as e:     # noqa: BLE001 - llguidance's own failure: this request only
                deltas.append(self._fail(req, "grammar compilation", e))
                continue
            for seq in req.seqs:
                seq.sampling.grammar = GrammarCompiler.matcher(compiled)
            self.scheduler.add(req.completions[0].seq)
        return deltas

    def _sample(self, logits: torch.Tensor, states: list[SamplingState]) -> list[SampleResult | Exception]:
        """Sample the batch at once; if that fails, sample row by row so only the row(s) that fail lose their
        request. Seeded generators are rewound first, so a seeded request draws the same tokens whether or
        not a neighbour's failure made it sample twice."""
        rewind = [(st.generator, st.generator.get_state()) for st in states if st.generator is not None]
        try:
            return self.sampler(logits, states)
        except Exception:
            log.warning("batched sampling of %d rows failed; sampling row by row", len(states), exc_info=True)
        for generator, state in rewind:
            generator.set_state(state)
        results: list[SampleResult | Exception] = []
        for i, st in enumerate(states):
            try:
                results.append(self.sampler(logits[i:i + 1], [st])[0])
            except Exception as e:
                results.append(e)
        return results

    def _fail(self, req: _Request, stage: str, error: Exception, public: HerdError | None = None) -> StreamDelta:
        """End a request whose own processing raised (all its completions): free its blocks and tell its
        caller `public`, or without internals (the log keeps the traceback)."""
        if public is not None:
            log.info("request %s refused in %s: %s", req.request_id, stage, public)
        else:
            log.error("request %s failed in %s; aborting it", req.request_id, stage, exc_info=error)
        self._requests.pop(req.request_id, None)
        self._compiling.pop(req.request_id, None)
        for seq in req.seqs:
            self.scheduler.finish(seq)
            seq.finish_reason = "error"
        seq = req.completions[0].seq
        return StreamDelta(req.request_id, [], "", None, "error", seq.num_prompt_tokens,
                           max(seq.num_cached_tokens, 0),
                           error=public or RequestFailedError(
                               f"request {req.request_id} failed during {stage} and was aborted"))

    def _build_step(self, batch: list[ScheduledSeq]):
        """The step's input, the sequences that sample (each with its row in the logits), and the prompt
        positions whose logits prompt_logprobs wants ((row, sequence, first position, count))."""
        step, sampled, prompt_rows, bs = StepInput(), [], [], self.block_size
        for s in batch:
            seq, start = s.seq, s.seq.num_computed
            table = self.kv.block_table(seq.seq_id)
            q_start = len(step.input_ids)
            positions = range(start, start + s.num_new)
            step.input_ids += seq.token_ids[start:start + s.num_new]
            step.positions += positions
            step.slot_mapping += [table[p // bs] * bs + p % bs for p in positions]
            ctx_len = start + s.num_new
            if s.num_new == 1:
                step.num_decode += 1
                step.decode_block_tables.append(table)
                step.decode_seq_lens.append(ctx_len)
            else:
                step.prefills.append((q_start, s.num_new, ctx_len, table))
            if seq.wants_prompt_logits:
                # Position p's logits predict prompt token p + 1; the last prompt position's is the sampling row.
                count = min(ctx_len, seq.num_prompt_tokens - 1) - start
                if count > 0:
                    prompt_rows.append((len(step.sample_indices), seq, start, count))
                    step.sample_indices += range(q_start, q_start + count)
            if s.completes:
                sampled.append((len(step.sample_indices), s))
                step.sample_indices.append(q_start + s.num_new - 1)
        return step, sampled, prompt_rows

    def _collect_prompt_logprobs(self, logits: torch.Tensor, prompt_rows) -> list[StreamDelta]:
        deltas = []
        for row, seq, start, count in prompt_rows:
            req = self._requests.get(seq.request_id)
            if req is None or req.prompt_logprobs is None:
                continue
            try:
                # Positions already reported (a recomputation after preemption) are not added twice.
                skip = len(req.prompt_logprobs) - 1 - start
                if skip >= count:
                    continue
                lp = torch.log_softmax(logits[row + skip:row + count].float(), -1)
                actual = torch.tensor(seq.prompt_token_ids[start + skip + 1:start + count + 1], dtype=torch.long)
                chosen = lp.gather(1, actual[:, None])[:, 0].tolist()
                n_top = min(req.params.prompt_logprobs, lp.shape[1])
                top = lp.topk(n_top, dim=-1) if n_top else None
                top_ids = top.indices.tolist() if top is not None else [[]] * len(chosen)
                top_vals = top.values.tolist() if top is not None else [[]] * len(chosen)
                for token, value, ids, vals in zip(actual.tolist(), chosen, top_ids, top_vals):
                    entry = dict(zip(ids, vals))
                    entry.setdefault(token, value)
                    req.prompt_logprobs.append(entry)
                if len(req.prompt_logprobs) >= seq.num_prompt_tokens:
                    seq.wants_prompt_logits = False
            except Exception as e:  # noqa: BLE001 - this request's own data
                deltas.append(self._fail(req, "prompt logprobs", e))
        return deltas

    def _on_token(self, req: _Request, comp: _Completion, token_id: int,
                  logprobs: dict[int, float] | None) -> StreamDelta | None:
        seq, params = comp.seq, comp.seq.params
        if not seq.output_token_ids and seq.index == 0:  # first token: the prompt's accounting is final now
            self._counters["prompt_tokens"] += seq.num_prompt_tokens
            self._counters["prefix_cache_hit_tokens"] += max(seq.num_cached_tokens, 0)
            # The prompt's blocks are in the prefix cache now: the other completions join the queue.
            for sibling in req.held:
                self.scheduler.add(sibling, front=True)
            req.held = []
        seq.append(token_id)
        self._counters["generation_tokens"] += 1
        grammar = seq.sampling.grammar
        if grammar is not None:
            grammar.accept(token_id)  # the mask allowed it, so this only fails on a bug: the request fails
        if logprobs is not None:
            comp.pending_logprobs.append(logprobs)
        is_stop_token = token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self._eos_ids)
        new_text = comp.detok.add(token_id) if comp.detok is not None and not is_stop_token else ""
        comp.unsent += new_text
        finish, cut_at = None, None
        if is_stop_token:
            finish = "stop"
        elif comp.stops is not None and new_text and (cut_at := comp.stops.feed(new_text)) is not None:
            comp.unsent = comp.unsent[:max(0, cut_at - comp.streamed_chars)]  # (a stop's start is never sent)
            finish = "stop"
        elif grammar is not None and grammar.is_finished:  # complete, and nothing more may follow
            finish = "stop"
        elif (params.max_tokens is not None and len(seq.output_token_ids) >= params.max_tokens) or \
                seq.num_tokens >= self.max_model_len:
            finish = "length"
        if finish is not None:
            if comp.detok is not None and cut_at is None:  # bytes held back for an unfinished character
                comp.unsent += comp.detok.flush()
            seq.finish_reason = finish
            self.scheduler.finish(seq)
            req.unfinished -= 1
            if req.unfinished == 0:
                self._requests.pop(req.request_id, None)
            return self._delta(req, comp, final=True)
        return self._delta(req, comp, final=False)

    def _delta(self, req: _Request, comp: _Completion, final: bool) -> StreamDelta | None:
        seq = comp.seq
        # While a stop string may be forming at the end of the text, that tail waits for the next tokens.
        held = comp.stops.holdback if comp.stops is not None and not final else 0
        text = comp.unsent[:max(0, len(comp.unsent) - held)]
        new_tokens = seq.output_token_ids[comp.streamed_tokens:]
        if not final and not new_tokens and not text:
            return None
        comp.unsent = comp.unsent[len(text):]
        comp.streamed_chars += len(text)
        comp.streamed_tokens = len(seq.output_token_ids)
        logprobs = None
        if seq.params.logprobs is not None:
            logprobs, comp.pending_logprobs = comp.pending_logprobs, []
        prompt_logprobs = None
        if req.prompt_logprobs is not None and not req.prompt_logprobs_sent:
            prompt_logprobs, req.prompt_logprobs_sent = req.prompt_logprobs, True
        scheduled_at = None
        if not comp.scheduled_at_sent:
            scheduled_at, comp.scheduled_at_sent = seq.first_scheduled_at, seq.first_scheduled_at is not None
        return StreamDelta(seq.request_id, new_tokens, text, logprobs, seq.finish_reason if final else None,
                           seq.num_prompt_tokens, max(seq.num_cached_tokens, 0), index=seq.index,
                           prompt_logprobs=prompt_logprobs, scheduled_at=scheduled_at)

    # ---- offline batch API ---------------------------------------------------------------------------
    def generate(self, prompts: Seq[str] | Seq[Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion in one continuously batched loop; outputs in prompt order (one per
        prompt, with all n of its completions)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise InvalidRequestError("prompts", "must be a list of prompts (strings or token-id lists)")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise InvalidRequestError("sampling_params", f"{len(sampling_params)} given for {len(prompts)} prompts")
        encoded = [self.encode_prompt(p) for p in prompts]
        for ids, params in zip(encoded, sampling_params):  # reject the whole batch before starting any of it
            self.validate(ids, params)
        outputs: dict[str, RequestOutput] = {}
        deltas: dict[str, list[StreamDelta]] = {}
        unfinished: dict[str, int] = {}
        order = []
        for ids, params in zip(encoded, sampling_params):
            rid = self.add_request(ids, params)
            outputs[rid] = RequestOutput(rid, ids, completions=[CompletionOutput(i) for i in range(params.n)])
            deltas[rid] = []
            unfinished[rid] = params.n
            order.append(rid)
        while unfinished:
            for d in self.step():
                if d.request_id in unfinished:
                    deltas[d.request_id].append(d)
                    if d.error is not None:
                        del unfinished[d.request_id]
                    elif d.finished:
                        unfinished[d.request_id] -= 1
                        if not unfinished[d.request_id]:
                            del unfinished[d.request_id]
        for rid in order:
            _gather(outputs[rid], deltas[rid])
        return [outputs[r] for r in order]

    # ---- operations ------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.kv.num_blocks, kv_blocks_free=self.kv.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions, **self._counters)

    def cached_block_hashes(self) -> list[int]:
        return self.kv.cached_block_hashes()

    def check_health(self) -> None:
        self.executor.check_health()

    def shutdown(self) -> None:
        if self._grammars is not None:
            self._grammars.shutdown()
        self.executor.shutdown()


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig) -> torch.dtype:
    """None/'auto': the checkpoint's dtype on GPU; float32 on CPU, where bf16/fp16 matmuls are slower and
    less exact on most processors."""
    if dtype is None or dtype == "auto":
        return cfg.stored_dtype if default_device().type == "cuda" else torch.float32
    return parse_dtype(dtype)


def _find_tokenizer(path: str) -> Tokenizer | None:
    try:
        return Tokenizer.from_pretrained_dir(path)
    except Exception as e:  # a checkpoint without a tokenizer still serves token-id prompts
        log.warning("%s: no usable tokenizer (%s); only token-id prompts will be accepted", path, e)
        return None


def _gather(output: RequestOutput, deltas: list[StreamDelta]) -> None:
    """A request's deltas into its output, each completion's merged in one pass (adding them one by one copied
    its text and logprobs so far at each: quadratic in a long answer); a failure last, as it came."""
    by_index: dict[int, list[StreamDelta]] = {}
    failed = None
    for d in deltas:
        if d.error is not None:
            failed = d
        else:
            by_index.setdefault(d.index, []).append(d)
    for index in sorted(by_index):
        output.add(StreamDelta.merged(by_index[index]))
    if failed is not None:
        output.add(failed)
