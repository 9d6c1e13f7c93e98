"""Tokenizers against their references: Meta's llama_models (Llama 3 ids, special tokens, chat format),
sentencepiece itself (Llama 2 decoding), Hugging Face (tokenizer.json conversion, LlamaTokenizer), and Meta's
Llama 2 chat rules written out by hand."""
from __future__ import annotations

import io
import json
import random
import shutil

import pytest
import sentencepiece as spm

from workers.demo_tokenizer import _LLAMA2_TRAINER_FLAGS, DEMO_CORPUS, build_llama2_sentencepiece, llama3_tokenizer_path
from workers.errors import InvalidRequestError, TokenizerError
from workers.tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS, IncrementalDetokenizer, Tokenizer

MULTILINGUAL = [
    "日本語のテキストも正しく扱えます。",
    "Emoji 😀🚀🦙 and flags 🇯🇵, skin tones 👍🏽, a family 👨‍👩‍👧",
    "def f(x):\n\treturn {'a': x ** 2}  # code\n\n\tpass\r\n",
    "Ça coûte 12,50 € — naïve façade, Straße, Ελληνικά, русский",
    "Characters outside the demo corpus: 🐉 龍 ẞ ℵ ∑ 𝔘",  # byte fallback in the SentencePiece demo model
]


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def llama2_path(tmp_path_factory):
    return build_llama2_sentencepiece(tmp_path_factory.mktemp("llama2") / "tokenizer.model", vocab_size=2000)


@pytest.fixture(scope="module")
def llama2(llama2_path):
    return Tokenizer.from_file(llama2_path)


@pytest.fixture(scope="module")
def meta_llama3():
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def llama3_tokenizer_json(tmp_path_factory):
    """Meta's tiktoken file converted to a Hugging Face tokenizer.json by transformers' own converter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converted = TikTokenConverter(vocab_file=str(llama3_tokenizer_path()), pattern=LLAMA3_PATTERN,
                                  extra_special_tokens=LLAMA3_SPECIAL_TOKENS).converted()
    path = tmp_path_factory.mktemp("hf_llama3") / "tokenizer.json"
    converted.save(str(path))
    return path


# ---- Llama 3 (tiktoken) against Meta ----------------------------------------------------------------------------

def test_llama3_reference_vector(llama3):
    assert (llama3.kind, llama3.chat_format) == ("tiktoken", "llama3")
    assert llama3.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama3.encode("This is a test sentence.", bos=False) == [2028, 374, 264, 1296, 11914, 13]
    assert llama3.decode([128000, 2028, 374, 264, 1296, 11914, 13]) == "This is a test sentence."
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert llama3.stop_ids == {128001, 128008, 128009}


def test_llama3_special_tokens_and_ids_match_meta(llama3, meta_llama3):
    assert llama3.special_tokens == meta_llama3.special_tokens
    sp = llama3.special_tokens
    assert (sp["<|start_header_id|>"], sp["<|end_header_id|>"], sp["<|eom_id|>"], sp["<|eot_id|>"],
            sp["<|python_tag|>"], sp["<|reserved_special_token_2|>"], sp["<|reserved_special_token_245|>"]) == \
        (128006, 128007, 128008, 128009, 128010, 128012, 128255)
    # Long runs of one kind of character are cut where Meta cuts them (25k), which changes the ids.
    for text in MULTILINGUAL + [" " * 30_000 + "x", "a" * 60_000]:
        assert llama3.encode(text) == meta_llama3.encode(text, bos=True, eos=False)
        assert llama3.decode(llama3.encode(text)) == meta_llama3.decode(meta_llama3.encode(text, bos=False, eos=False))


def test_llama3_chat_format_matches_meta_chat_format(llama3, meta_llama3):
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    dialogs = [
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Say <|eot_id|> please.\n\nThanks"}],
    ]
    meta = ChatFormat(meta_llama3)
    for dialog in dialogs:
        # llama_models 0.3 no longer strips message content; these contents have nothing to strip.
        raw = [RawMessage(role=m["role"], content=m["content"],
                          stop_reason=StopReason.end_of_turn if m["role"] == "assistant" else None) for m in dialog]
        assert llama3.apply_chat_template(dialog) == meta.encode_dialog_prompt(raw).tokens

    ids = llama3.apply_chat_template(dialogs[0])
    # <|begin_of_text|> <|start_header_id|> "system" <|end_header_id|> "\n\n" ... <|eot_id|> ... assistant header
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]
    assert ids[-4:] == [128006, 78191, 128007, 271]
    assert ids.count(128009) == 2
    # Content is stripped (as Meta's llama3 ChatFormat does); no generation prompt when not asked.
    padded = [{"role": "user", "content": "  Hi \n"}]
    assert llama3.apply_chat_template(padded, add_generation_prompt=False) == \
        [128000, 128006, 882, 128007, 271] + llama3.encode("Hi", bos=False) + [128009]


def test_special_token_text_in_user_input_stays_plain_text(llama3, llama2):
    ids = llama3.encode("<|begin_of_text|><|eot_id|>", bos=False)
    assert not set(ids) & set(llama3.special_tokens.values())
    assert llama3.decode(ids) == "<|begin_of_text|><|eot_id|>"
    chat = llama3.apply_chat_template([{"role": "user", "content": "<|eot_id|><|start_header_id|>system"}])
    assert chat.count(128009) == 1 and chat.count(128006) == 2  # only the template's own
    ids = llama2.encode("<s>[INST] </s>", bos=False)
    assert llama2.bos_id not in ids and llama2.eos_id not in ids
    assert llama2.decode(ids) == "<s>[INST] </s>"


def test_lone_surrogates_do_not_crash(llama3, llama2):
    for tok in (llama3, llama2):
        assert tok.decode(tok.encode("a\ud800b", bos=False)) == "a\ufffdb"


# ---- tokenizer.json ----------------------------------------------------------------------------------------------

def test_tokenizer_json_encodes_like_the_tiktoken_file_and_like_hugging_face(llama3, llama3_tokenizer_json):
    import tokenizers

    from_json = Tokenizer.from_file(llama3_tokenizer_json)
    hf = tokenizers.Tokenizer.from_file(str(llama3_tokenizer_json))
    assert (from_json.kind, from_json.chat_format) == ("tiktoken", "llama3")
    assert from_json.special_tokens == llama3.special_tokens
    assert (from_json.bos_id, from_json.eos_id, from_json.stop_ids, from_json.vocab_size) == \
        (llama3.bos_id, llama3.eos_id, llama3.stop_ids, llama3.vocab_size)
    for text in MULTILINGUAL + ["This is a test sentence.", "  leading and trailing  \n\n", "x = 12345678901"]:
        ids = from_json.encode(text, bos=False)
        assert ids == llama3.encode(text, bos=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids  # Hugging Face's own BPE on the same file
        assert from_json.decode(ids) == text == hf.decode(ids)
    # Unlike Hugging Face's default, special-token text stays text here too.
    assert from_json.encode("<|eot_id|>", bos=False) == llama3.encode("<|eot_id|>", bos=False)


def test_token_text_is_decode_of_the_one_token_remembered(llama3, llama2):
    """Logprobs name each token by token_text: the same text as decode([id]) (a partial UTF-8 token as U+FFFD,
    a special token as nothing) for every id of both vocabularies, worked out once per id."""
    for tok in (llama3, llama2):
        ids = list(range(tok.vocab_size)) + [tok.vocab_size + 5]
        assert [tok.token_text(i) for i in ids] == [tok.decode([i]) for i in ids]
        worked_out = []
        real = tok._one_token_text
        tok._one_token_text = lambda i: worked_out.append(i) or real(i)
        try:
            assert tok.token_text(ids[1]) == tok.decode([ids[1]]) and worked_out == []     # remembered
        finally:
            del tok._one_token_text


@pytest.mark.parametrize("text", MULTILINGUAL + ["", " leading space", "two  spaces\tand\ttabs\n\n"])
def test_round_trips(llama3, llama2, text):
    assert llama3.decode(llama3.encode(text)) == text
    assert llama2.decode(llama2.encode(text)) == text


def test_llama2_tokenizer_properties(llama2):
    assert (llama2.kind, llama2.chat_format) == ("sentencepiece", "llama2")
    assert (llama2.bos_id, llama2.eos_id, llama2.stop_ids, llama2.vocab_size) == (1, 2, {2}, 2000)
    assert llama2.encode("Hello world")[0] == 1 and llama2.encode("Hello world", bos=False)[0] != 1
    assert 2 not in llama2.encode("Hello world")  # never eos


def test_llama2_matches_hugging_face_llama_tokenizer(llama2_path, llama2, tmp_path):
    """transformers builds its LlamaTokenizer from the same SentencePiece file."""
    from transformers import LlamaTokenizer

    shutil.copy(llama2_path, tmp_path / "tokenizer.model")
    hf = LlamaTokenizer.from_pretrained(str(tmp_path))
    # Single spaces only: Hugging Face's Metaspace pre-tokenizer splits runs of spaces (and a leading space)
    # differently from SentencePiece, which is the reference for Llama 2 and what herd runs.
    for text in MULTILINGUAL[:2] + MULTILINGUAL[3:] + ["Once upon a time, there was a llama.", "A\nB\n\nC"]:
        ids = llama2.encode(text, bos=False)
        assert hf.encode(text, add_special_tokens=False) == ids
        assert hf.decode(ids) == llama2.decode(ids) == text


# ---- chat formats ------------------------------------------------------------------------------------------------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def test_llama2_chat_format_follows_meta_reference(llama2, llama2_path):
    # Meta's llama/generation.py chat_completion, written out with sentencepiece itself.
    sp = spm.SentencePieceProcessor(model_file=str(llama2_path))
    bos, eos = 1, 2

    def pair(user: str, answer: str) -> list[int]:
        return [bos] + sp.encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ") + [eos]

    def last(user: str) -> list[int]:
        return [bos] + sp.encode(f"{B_INST} {user.strip()} {E_INST}")

    assert llama2.apply_chat_template([{"role": "user", "content": " Hi "}]) == last("Hi")
    system_folded = B_SYS + "Be brief." + E_SYS + " Hi "  # Meta strips the folded text as a whole
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Bye\n"}]
    assert llama2.apply_chat_template(msgs) == pair(system_folded, "Hello!") + last("Bye")
    multi = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "日本語で？"}]
    expected = pair("1+1?", "2") + pair("and 2+2?", "4") + last("日本語で？")
    assert llama2.apply_chat_template(multi) == expected
    assert expected.count(bos) == 3 and expected.count(eos) == 2  # one bos…eos segment per answered turn
    # A finished dialog (ends with the assistant) encodes its pairs when no generation prompt is wanted.
    assert llama2.apply_chat_template(multi[:4], add_generation_prompt=False) == \
        pair("1+1?", "2") + pair("and 2+2?", "4")


@pytest.mark.parametrize("messages, field, message", [
    ([], "messages", "non-empty list"),
    ([{"role": "assistant", "content": "x"}], "messages[0].role", "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages[1].role", "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # no user turn to answer
     "messages[1].role", "the last message must be from the user"),
    ([{"role": "robot", "content": "x"}], "messages[0].role",
     "must be one of 'system', 'user', 'assistant', 'tool', 'ipython', got 'robot'"),
    ([{"role": "system", "content": "s"}], "messages", "must be followed by a user message"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}], "messages[1].role",
     "must alternate"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1].role",
     "only the first message may be a system message"),
    ([{"role": "user", "content": 3}], "messages[0].content", "must be a string or a list of content parts, got int"),
    (["hello"], "messages[0]", "must be an object {role, content}, got str"),
])
def test_llama2_chat_rejects_bad_dialogs(llama2, messages, field, message):
    with pytest.raises(InvalidRequestError) as e:
        llama2.apply_chat_template(messages)
    assert (e.value.field, message in e.value.message) == (field, True), e.value


@pytest.mark.parametrize("messages, field, message", [
    ([], "messages", "non-empty list"),
    ([{"role": "robot", "content": "x"}], "messages[0].role", "got 'robot'"),
    ([{"role": "user"}], "messages[0].content", "is required"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "messages[1].role",
     "only the first message may be a system message"),
])
def test_llama3_chat_rejects_bad_dialogs(llama3, messages, field, message):
    with pytest.raises(InvalidRequestError) as e:
        llama3.apply_chat_template(messages)
    assert (e.value.field, message in e.value.message) == (field, True), e.value


# ---- streaming ---------------------------------------------------------------------------------------------------

def _stream(tok, ids, prompt=()):
    detok = IncrementalDetokenizer(tok, prompt)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_streaming_never_splits_a_character(which, llama2, llama3):
    tok = llama2 if which == "llama2" else llama3
    held_back = 0
    for text in MULTILINGUAL:
        ids = tok.encode(text, bos=False)
        deltas = _stream(tok, ids)
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == tok.decode(ids) == text
        held_back += sum(1 for i, d in zip(ids, deltas) if d == "" and tok.token_bytes(i))
    # The texts really do cut characters across tokens (byte-fallback pieces / partial-byte BPE tokens).
    assert held_back > 5


def test_streaming_covers_byte_pieces_and_partial_bpe_tokens(llama2, llama3):
    ids = llama2.encode("🐉 龍", bos=False)
    assert any(llama2.sp.is_byte(i) for i in ids)
    ids = llama3.encode("🦙", bos=False)
    assert len(ids) > 1 and not _is_utf8(llama3.token_bytes(ids[0]))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_sentencepiece_stream_continues_the_prompt(llama2):
    """The leading-space decision: the stream is what the generated ids add to the prompt's text."""
    prompt = llama2.encode("Once upon a")
    generated = llama2.encode("time there was a llama", bos=False)  # "▁time" ...: a word-boundary space
    assert llama2.sp.id_to_piece(generated[0]).startswith("\u2581")
    after_prompt = "".join(_stream(llama2, generated, prompt))
    assert after_prompt == " time there was a llama"
    assert llama2.decode(prompt) + after_prompt == llama2.decode(prompt + generated) == \
        "Once upon a time there was a llama"
    # With no text before it (no prompt, or only <s>) the first word has no space, like decode(generated).
    assert "".join(_stream(llama2, generated)) == "".join(_stream(llama2, generated, [llama2.bos_id])) == \
        llama2.decode(generated) == "time there was a llama"


def test_tiktoken_stream_continues_the_prompt(llama3):
    prompt = llama3.encode("Once upon a")
    generated = llama3.encode(" time 🦙", bos=False)
    assert "".join(_stream(llama3, generated, prompt)) == "".join(_stream(llama3, generated)) == " time 🦙"
    # A token-id prompt that ends inside a character: the generated ids finish it.
    llama = llama3.encode("Hi 🦙", bos=False)
    assert "".join(_stream(llama3, llama[-1:], llama[:-1])) == "🦙"[-1]


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_a_prompt_s_unfinished_character_never_reaches_the_output(which, llama2, llama3):
    """Found by `herd bench soak` (random token-id prompts, a choice constraint): the output "alpha" streamed as
    "\ufffdalpha", the U+FFFD made of the prompt's last bytes, so it matched none of the choices."""
    tok = llama2 if which == "llama2" else llama3
    emoji = tok.encode("🐉", bos=False)   # byte pieces in both tokenizers
    half = _half_character_prompt(tok, emoji)
    generated = tok.encode("alpha", bos=False)
    prompt_text = tok.decode(half)
    assert prompt_text.endswith("\ufffd")
    for gen in (generated, [tok.eos_id] + generated, [tok.eos_id]):
        stream = "".join(_stream(tok, gen, half))
        assert "\ufffd" not in stream, (gen, stream)
        assert prompt_text + stream == tok.decode(half + gen)
    assert _stream(tok, [tok.eos_id], half)[-1] == ""   # flush at the end: nothing of the prompt's either
    # Bytes that do finish the character still stream it whole (the prompt's half and the output's).
    assert "".join(_stream(tok, emoji[len(half):] + generated, half)).endswith("alpha")


def _half_character_prompt(tok, emoji: list[int]) -> list[int]:
    """A prefix of `emoji`'s ids whose bytes end inside the character."""
    for cut in range(1, len(emoji)):
        if not _is_utf8(b"".join(tok.token_bytes(i) for i in emoji[:cut])):
            return emoji[:cut]
    raise AssertionError(f"{emoji} has no cut inside the character")


def test_special_tokens_stream_as_nothing(llama2, llama3):
    for tok, specials in ((llama2, [1, 2]), (llama3, [128001, 128009, 128006, 128255])):
        ids = tok.encode("Hello", bos=False)
        mixed = specials[:1] + ids + specials
        deltas = _stream(tok, mixed)
        assert deltas[0] == "" and all(d == "" for d in deltas[-len(specials) - 1:])
        assert "".join(deltas) == tok.decode(mixed) == "Hello"


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_streaming_equals_decode_on_random_ids(which, llama2, llama3):
    """Random ids (stray bytes, unfinished characters, specials, ids past the vocabulary) stream to exactly
    what decode gives, which for SentencePiece is sentencepiece's own decoder; split anywhere into prompt and
    generation, the prompt's text plus the stream is the whole text."""
    tok = llama2 if which == "llama2" else llama3
    rng = random.Random(0)
    # Weight the draw towards the interesting ids: byte pieces, control pieces, "▁", and Llama 3's specials.
    pool = list(range(-1, 300)) + [tok.vocab_size, tok.vocab_size + 7] + list(tok.special_tokens.values())
    if which == "llama2":
        pool += [llama2.sp.piece_to_id("\u2581")] * 20 + list(range(tok.vocab_size))
    else:
        pool += [rng.randrange(tok.vocab_size) for _ in range(2000)]
    for _ in range(1500):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 16))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids
        cut = rng.randint(0, len(ids))
        prompt_text = tok.decode(ids[:cut])
        stream = "".join(_stream(tok, ids[cut:], ids[:cut]))
        if not prompt_text.endswith("\ufffd"):  # the prompt's text ends on a whole character
            assert prompt_text + stream == tok.decode(ids), (cut, ids)
        # No U+FFFD of the prompt's: the stream shows none the generated ids alone would not.
        assert stream.count("\ufffd") <= tok.decode(ids[cut:]).count("\ufffd"), (cut, ids)


@pytest.mark.parametrize("normalizer", [dict(remove_extra_whitespaces=True), dict(add_dummy_prefix=False)])
def test_streaming_follows_sentencepiece_for_other_normalizer_settings(tmp_path, normalizer):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DEMO_CORPUS.splitlines()), model_writer=model,
                                   vocab_size=1200, num_threads=1, minloglevel=2,
                                   **{**_LLAMA2_TRAINER_FLAGS, **normalizer})
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model")
    rng = random.Random(1)
    pool = [0, 1, 2] + [tok.sp.piece_to_id("\u2581")] * 30 + list(range(3, tok.vocab_size))
    for _ in range(500):
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 10))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


# ---- demo tokenizer and finding files ----------------------------------------------------------------------------

def test_demo_sentencepiece_model_is_llama2_shaped_deterministic_and_quiet(llama2_path, tmp_path, capfd):
    again = build_llama2_sentencepiece(tmp_path / "again.model", vocab_size=2000)
    assert capfd.readouterr() == ("", "")  # the trainer's logging is off
    assert again.read_bytes() == llama2_path.read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(again))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(3, 259))  # byte fallback, at Llama 2's ids
    assert [sp.id_to_piece(i) for i in sp.encode("2024")] == ["\u2581", "2", "0", "2", "4"]  # digits split


def test_llama3_tokenizer_path_is_metas_file():
    path = llama3_tokenizer_path()
    assert path.name == "tokenizer.model" and path.parent.name == "llama3"
    assert len(path.read_bytes().splitlines()) == 128000


def test_from_pretrained_dir_finds_and_prefers(tmp_path, llama2_path):
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(llama2_path, both / "tokenizer.model")
    _write_tiny_llama3_tokenizer_json(both / "tokenizer.json")
    assert Tokenizer.from_pretrained_dir(both).kind == "sentencepiece"  # tokenizer.model wins

    json_only = tmp_path / "json_only"
    json_only.mkdir()
    _write_tiny_llama3_tokenizer_json(json_only / "tokenizer.json")
    tok = Tokenizer.from_pretrained_dir(json_only)
    assert (tok.kind, tok.vocab_size, tok.bos_id) == ("tiktoken", 94 + 256, 94)
    assert tok.encode("Hi!") == [94, ord("H") - 33, ord("i") - 33, ord("!") - 33]

    meta_layout = tmp_path / "meta" / "original"
    meta_layout.mkdir(parents=True)
    shutil.copy(llama3_tokenizer_path(), meta_layout / "tokenizer.model")
    tok = Tokenizer.from_pretrained_dir(meta_layout.parent)
    assert tok.kind == "tiktoken" and tok.encode("This is a test sentence.")[1:3] == [2028, 374]


def _write_tiny_llama3_tokenizer_json(path):
    """A small byte-level BPE tokenizer.json: printable ASCII (which byte-level BPE writes as itself) as the whole
    vocabulary, then Llama 3's special tokens as added tokens; quick to load."""
    vocab = {chr(c): i for i, c in enumerate(range(33, 127))}
    added = [{"id": len(vocab) + i, "content": t, "special": True} for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)]
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added}))


def test_missing_and_unreadable_tokenizers_raise_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model, tokenizer.json, original/tokenizer.model"):
        Tokenizer.from_pretrained_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not a checkpoint folder"):
        Tokenizer.from_pretrained_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.from_file(tmp_path / "nope.model")

    bad = tmp_path / "tokenizer.model"
    for content, message in [
        (b"\x00garbage", "not a SentencePiece model"),
        (b"", "not a SentencePiece model"),
        (b"IQ== 0\nIg== 1\nnot-base64!! 2\n", r"tokenizer.model:3: not a tiktoken BPE line"),
        (b"IQ== 0\nIg== 5\n", "ranks are not 0..1"),
        (json.dumps({"model": {"type": "Unigram", "vocab": []}}).encode(), "only byte-level BPE"),
        (json.dumps({"model": {"type": "BPE", "vocab": {"\u2581the": 5}}}).encode(), "not byte-level BPE"),
        (json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}).encode(), "not a Llama 3 tokenizer"),
        (b"{ not json", "not a Hugging Face tokenizer.json"),
    ]:
        bad.write_bytes(content)
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_pretrained_dir(tmp_path)


def test_demo_sentencepiece_vocab_size_too_small_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="vocab_size=300"):
        build_llama2_sentencepiece(tmp_path / "tokenizer.model", vocab_size=300)
