"""prompt_logprobs: every prompt position's log-probability (and top-N) from the engine's own prefill, equal to
a full forward pass of Hugging Face transformers, however the prefill is chunked and whether or not the
prompt's blocks are in the prefix cache (a request that asks for them does not reuse cached blocks)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from tests.checkpoints import LLAMA2_MHA, make_checkpoint
from workers import AsyncEngine, Engine, SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("plp"), "llama2", LLAMA2_MHA)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, hf


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(4, LLAMA2_MHA["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)  # [P, V]


def check(entries, ref: torch.Tensor, ids: list[int], top_n: int) -> None:
    assert len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        entry, row = entries[j], ref[j - 1]
        assert ids[j] in entry and abs(entry[ids[j]] - row[ids[j]].item()) < 1e-4
        top = row.topk(top_n).indices.tolist()
        assert set(top) <= set(entry) and len(entry) <= top_n + 1
        for t, v in entry.items():
            assert abs(v - row[t].item()) < 1e-4


def engine_for(path, **kw) -> Engine:
    return Engine.from_pretrained(path, dtype="float32", show_progress=False, kv_cache_memory=32 << 20, **kw)


@pytest.mark.parametrize("engine_args", [{}, {"max_num_batched_tokens": 16}], ids=["one-chunk", "chunked"])
def test_prompt_logprobs_equal_a_full_forward(model, engine_args):
    path, hf = model
    ids = [prompt(70), prompt(5, seed=1), prompt(2, seed=2)]
    eng = engine_for(path, **engine_args)
    try:
        outs = eng.generate(ids, [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=n) for n in (3, 0, 20)])
    finally:
        eng.shutdown()
    for out, p, n in zip(outs, ids, (3, 0, 20)):
        check(out.prompt_logprobs, reference(hf, p), p, n)


def test_a_prompt_longer_than_one_logits_chunk(model):
    # More than PROMPT_LOGITS_CHUNK (256) positions: the prefill is split so its logits stay bounded.
    path, hf = model
    ids = prompt(300, seed=3)
    eng = engine_for(path)
    try:
        out = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=1))[0]
        plain = eng.generate([prompt(40, seed=9)], SamplingParams(max_tokens=2, temperature=0))[0]
    finally:
        eng.shutdown()
    check(out.prompt_logprobs, reference(hf, ids), ids, 1)
    assert plain.prompt_logprobs is None  # only when asked for


def test_cached_prompts_are_still_reported(model):
    path, hf = model
    ids = prompt(64, seed=4)
    eng = engine_for(path)
    try:
        first = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0))[0]
        warm = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0))[0]
        asked = eng.generate([ids], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2))[0]
    finally:
        eng.shutdown()
    assert warm.num_cached_tokens == 48 and asked.num_cached_tokens == 0  # computed, not reused
    check(asked.prompt_logprobs, reference(hf, ids), ids, 2)
    assert asked.token_ids == first.token_ids


def test_prompt_logprobs_come_once_on_the_first_delta(model):
    path, hf = model
    ids = prompt(30, seed=5)
    params = SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=0, prompt_logprobs=1, ignore_eos=True)

    async def main():
        eng = AsyncEngine.from_pretrained(path, dtype="float32", show_progress=False, kv_cache_memory=32 << 20)
        try:
            return [d async for d in eng.generate(ids, params)]
        finally:
            eng.shutdown()

    deltas = asyncio.run(asyncio.wait_for(main(), 60))
    with_prompt = [d for d in deltas if d.prompt_logprobs is not None]
    assert len(with_prompt) == 1 and with_prompt[0] is deltas[0]
    check(with_prompt[0].prompt_logprobs, reference(hf, ids), ids, 1)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_pipeline_microbatches_keep_every_prompt_row(parts):
    """A pipeline-parallel step is split by sequence; a sequence that wants its prompt's logits has several
    rows, and the concatenated micro-batch logits must still be the step's rows, in order."""
    from workers.model_runner import StepInput
    step = StepInput()
    step.input_ids = list(range(1, 15))
    step.positions = list(range(14))
    step.slot_mapping = list(range(14))
    step.num_decode = 2
    step.decode_block_tables, step.decode_seq_lens = [[0], [1]], [3, 5]
    step.prefills = [(2, 5, 5, [2, 3]), (7, 7, 7, [4, 5])]
    step.sample_indices = [0, 1, 2, 3, 4, 5, 6, 13]  # the first prefill keeps all its rows
    micro = step.split(parts)
    assert [mb.input_ids[i] - 1 for mb in micro for i in mb.sample_indices] == step.sample_indices


def test_preemption_during_the_prompt_does_not_repeat_or_lose_positions(model):
    """Growing sequences in a 12-block pool preempt the latest arrival, the prompt_logprobs request, while its
    prompt is prefilled in small chunks: it is recomputed from the start, and each position is reported once."""
    path, hf = model
    ids = prompt(30, seed=6)
    eng = engine_for(path, num_gpu_blocks_override=12, block_size=4, max_model_len=48, max_num_batched_tokens=8)
    mid_prompt = []
    preempt = eng.scheduler._preempt

    def spy(seq):  # test-only wrap: was it preempted while its prompt's logits were still being collected?
        mid_prompt.append(seq.wants_prompt_logits and 0 < seq.num_computed < seq.num_prompt_tokens)
        preempt(seq)
    eng.scheduler._preempt = spy
    try:
        others = [prompt(6, seed=10 + i) for i in range(3)]
        grow = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        outs = eng.generate(others + [ids], [grow] * 3 + [SamplingParams(max_tokens=4, temperature=0,
                                                                         prompt_logprobs=2, ignore_eos=True)])
    finally:
        eng.shutdown()
    assert any(mid_prompt)
    check(outs[-1].prompt_logprobs, reference(hf, ids), ids, 2)
