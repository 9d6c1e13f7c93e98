"""The engine against Hugging Face transformers on tiny random checkpoints (greedy tokens and logits)."""
from __future__ import annotations

import pytest
import torch

from tests.checkpoints import LLAMA2_MHA, LLAMA3_GQA_TIED, LLAMA3_ROPE_PARAMETERS, make_checkpoint
from workers import Engine, InvalidRequestError, RequestOutput, SamplingParams
from workers.config import ModelConfig
from workers.model_runner import ModelRunner, StepInput

transformers = pytest.importorskip("transformers")

FLAVOURS = {
    "llama2-mha-sharded": (LLAMA2_MHA, 3),
    "llama3-gqa-tied-bf16": (LLAMA3_GQA_TIED, 1),
    "rope-parameters": (LLAMA3_ROPE_PARAMETERS, 1),
}
N_NEW = 12


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = [5, 37, 16, 1, 64, 23]
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(FLAVOURS))
def flavour(request, tmp_path_factory):
    spec, shards = FLAVOURS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param, spec, num_shards=shards)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = prompts_for(spec["vocab_size"])
    expected = [hf_greedy(hf, p, N_NEW) for p in prompts]
    return path, hf, prompts, expected


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)


def run(path, prompts, **engine_args):
    engine = Engine.from_pretrained(path, dtype="float32", show_progress=False, **engine_args)
    try:
        return engine, engine.generate(prompts, GREEDY)
    finally:
        engine.shutdown()


def test_last_position_logits_match_transformers(flavour):
    path, hf, prompts, _ = flavour
    cfg = ModelConfig.from_pretrained(path)
    runner = ModelRunner(cfg, dtype=torch.float32, max_model_len=256, block_size=16)
    runner.load_weights(str(path), show_progress=False)
    runner.allocate_kv_cache(16)
    prompt = prompts[4]
    n = len(prompt)
    table = [3, 7, 1, 9, 0]  # deliberately scattered physical blocks
    step = StepInput(input_ids=prompt, positions=list(range(n)),
                     slot_mapping=[table[p // 16] * 16 + p % 16 for p in range(n)],
                     prefills=[(0, n, n, table)], sample_indices=[n - 1])
    ours = runner.execute(step)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_batch_greedy_equals_transformers(flavour):
    path, _, prompts, expected = flavour
    _, outs = run(path, prompts)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)


def test_portable_torch_paths_equal_transformers(flavour, monkeypatch):
    """What runs where herd's CPU shortcuts do not (GPU, HERD_CPU_KERNELS=0, HERD_PACK_WEIGHTS=0): gather +
    SDPA attention, torch-expression layer ops, plain F.linear."""
    import workers.model_runner as model_runner
    from workers.attention import TorchPagedAttention
    from workers.layer_ops import TorchLayerOps
    monkeypatch.setattr(model_runner, "select_attention_backend", lambda device: TorchPagedAttention())
    monkeypatch.setattr(model_runner, "select_layer_ops", lambda device: TorchLayerOps())
    monkeypatch.setenv("HERD_PACK_WEIGHTS", "0")
    path, hf, prompts, expected = flavour
    engine, outs = run(path, prompts)
    model = engine.executor.runner.model
    assert isinstance(model.ops, TorchLayerOps) and type(model.ops) is TorchLayerOps
    assert model.layers[0].qkv.layout == torch.strided
    assert [o.token_ids for o in outs] == expected


def test_chunked_prefill_same_tokens(flavour):
    path, _, prompts, expected = flavour
    engine, outs = run(path, prompts, max_num_batched_tokens=7)  # every long prompt spans several steps
    assert [o.token_ids for o in outs] == expected


def test_preemption_same_tokens(flavour):
    path, _, prompts, expected = flavour
    # 6 blocks of 16 tokens: the first four prompts fill the pool, so growing sequences must preempt.
    engine, outs = run(path, prompts, num_gpu_blocks_override=6, max_model_len=96)
    assert [o.token_ids for o in outs] == expected
    assert engine.scheduler.num_preemptions > 0


def test_prefix_cache_on_off_identical_and_hits_on_repeat(flavour):
    path, _, prompts, expected = flavour
    shared = prompts[4][:48]
    followups = [shared + [5, 6, 7], shared + [9, 10]]
    engine = Engine.from_pretrained(path, dtype="float32", show_progress=False, enable_prefix_caching=True)
    try:
        first = engine.generate(followups[:1], GREEDY)[0]
        second = engine.generate(followups[1:], GREEDY)[0]
        again = engine.generate(prompts, GREEDY)
    finally:
        engine.shutdown()
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 48
    assert again[4].num_cached_tokens == 48  # prompts[4] starts with the same 48 tokens
    _, off = run(path, followups, enable_prefix_caching=False)
    assert [first.token_ids, second.token_ids] == [o.token_ids for o in off]
    assert all(o.num_cached_tokens == 0 for o in off)
    assert [o.token_ids for o in again] == expected


def test_cache_salt_isolates_prefix_cache_hits(tmp_path):
    """Per-tenant isolation: the same prompt under another salt computes everything again (no hit to time),
    under its own salt it hits, and the tokens are the same either way."""
    path = make_checkpoint(tmp_path, "salt", LLAMA2_MHA)
    engine = Engine.from_pretrained(path, dtype="float32", show_progress=False)
    prompt = list(range(5, 60))  # three full 16-token blocks

    def once(salt):
        rid = engine.add_request(prompt, GREEDY, cache_salt=salt)
        out = RequestOutput(rid, prompt)
        while engine.has_unfinished():
            for d in engine.step():
                out.add(d)
        return out

    try:
        a, b, a_again, plain = once(0xA), once(0xB), once(0xA), once(0)
    finally:
        engine.shutdown()
    assert [a.num_cached_tokens, b.num_cached_tokens, a_again.num_cached_tokens, plain.num_cached_tokens] == \
        [0, 0, 48, 0]
    assert a.token_ids == b.token_ids == a_again.token_ids == plain.token_ids


def test_max_tokens_none_runs_until_the_context_ends(tmp_path):
    path = make_checkpoint(tmp_path, "ctx", LLAMA2_MHA)
    engine = Engine.from_pretrained(path, dtype="float32", show_progress=False, max_model_len=40)
    try:
        outs = engine.generate([list(range(5, 15)), list(range(5, 38))],
                               SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True))
        with pytest.raises(Exception, match="max_model_len"):
            engine.generate([list(range(5, 45))], SamplingParams(max_tokens=None))
    finally:
        engine.shutdown()
    assert [len(o.token_ids) for o in outs] == [30, 7]  # max_model_len - prompt length
    assert all(o.finish_reason == "length" for o in outs)


def test_logit_bias_through_the_engine(tmp_path):
    path = make_checkpoint(tmp_path, "bias", LLAMA2_MHA)
    engine = Engine.from_pretrained(path, dtype="float32", show_progress=False)
    prompt = list(range(5, 25))
    try:
        plain = engine.generate([prompt], GREEDY)[0].token_ids
        forced = engine.generate([prompt], SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True,
                                                          logit_bias={"77": 100}))[0].token_ids
        banned = engine.generate([prompt], SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True,
                                                          logit_bias={t: -100 for t in set(plain)}))[0].token_ids
        with pytest.raises(InvalidRequestError) as err:
            engine.generate([prompt], SamplingParams(logit_bias={LLAMA2_MHA["vocab_size"]: 1}))
    finally:
        engine.shutdown()
    assert forced == [77] * N_NEW
    assert not set(banned) & set(plain) and len(banned) == N_NEW
    assert err.value.field == "logit_bias" and "vocabulary" in err.value.message
