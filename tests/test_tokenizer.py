"""Tokenizers: Meta's Llama 3 reference ids, tokenizer.json conversion, Llama 2/3 chat formats, streaming."""
from __future__ import annotations

import json

import pytest

from workers.demo_tokenizer import build_llama2_sentencepiece, llama3_tokenizer_path
from workers.errors import InvalidRequestError, TokenizerError
from workers.tokenizer import IncrementalDetokenizer, Tokenizer, _unicode_to_bytes

MULTILINGUAL = [
    "日本語のテキストも正しく扱えます。",
    "Emoji 😀🚀🦙 and flags 🇯🇵 in text",
    "def f(x):\n\treturn {'a': x ** 2}  # code\n",
    "Ça coûte 12,50 € — naïve façade, Straße, Ελληνικά, русский",
]


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer.from_file(llama3_tokenizer_path())


@pytest.fixture(scope="module")
def llama2(tmp_path_factory):
    return Tokenizer.from_file(build_llama2_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model"))


def test_llama3_reference_vector(llama3):
    assert llama3.kind == "tiktoken" and llama3.chat_format == "llama3"
    assert llama3.encode("This is a test sentence.") == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert llama3.decode([128000, 2028, 374, 264, 1296, 11914, 13]) == "This is a test sentence."
    assert (llama3.bos_id, llama3.eos_id, llama3.vocab_size) == (128000, 128001, 128256)
    assert llama3.stop_ids == {128001, 128008, 128009}


def test_llama3_chat_header_ids(llama3):
    ids = llama3.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    nl2 = llama3.encode("\n\n", bos=False)
    expected = ([128000, 128006] + llama3.encode("system", bos=False) + [128007] + nl2 +
                llama3.encode("Be brief.", bos=False) + [128009, 128006] + llama3.encode("user", bos=False) +
                [128007] + nl2 + llama3.encode("Hi", bos=False) + [128009, 128006] +
                llama3.encode("assistant", bos=False) + [128007] + nl2)
    assert ids == expected
    assert ids[:4] == [128000, 128006, 9125, 128007] and ids[-4:] == [128006, 78191, 128007, 271]


def test_special_token_text_in_user_input_stays_plain_text(llama3):
    ids = llama3.encode("<|eot_id|>", bos=False)
    assert 128009 not in ids and llama3.decode(ids) == "<|eot_id|>"


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trips(llama3, llama2, text):
    assert llama3.decode(llama3.encode(text)) == text
    assert llama2.decode(llama2.encode(text)) == text


def test_tokenizer_json_matches_the_tiktoken_file(llama3, tmp_path):
    # Write the Llama 3 vocabulary as a Hugging Face byte-level BPE tokenizer.json.
    to_unicode = {b: c for c, b in _unicode_to_bytes().items()}
    ranks = llama3.encoding._mergeable_ranks
    vocab = {"".join(to_unicode[b] for b in token): rank for token, rank in ranks.items()}
    added = [{"id": i, "content": t, "special": True} for t, i in llama3.special_tokens.items()]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []}, "added_tokens": added}))
    from_json = Tokenizer.from_file(path)
    for text in MULTILINGUAL + ["This is a test sentence."]:
        assert from_json.encode(text) == llama3.encode(text)
    assert from_json.stop_ids == llama3.stop_ids


def test_llama2_chat_format_follows_meta_reference(llama2):
    enc = llama2.encode
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    # Meta strips the folded system+user content as a whole, so the user's own leading space survives.
    expected = (enc("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello! ") + [llama2.eos_id] +
                enc("[INST] Bye [/INST]"))
    assert llama2.apply_chat_template(msgs) == expected
    assert expected[0] == 1 and expected.count(1) == 2  # one bos…eos segment per pair
    with pytest.raises(InvalidRequestError):
        llama2.apply_chat_template([{"role": "assistant", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        llama2.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(InvalidRequestError):
        llama2.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(InvalidRequestError):
        llama2.apply_chat_template([])


@pytest.mark.parametrize("which", ["llama2", "llama3"])
def test_streaming_never_splits_a_character(which, llama2, llama3):
    tok = llama2 if which == "llama2" else llama3
    for text in MULTILINGUAL:
        ids = tok.encode(text, bos=False)
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.add(i) for i in ids] + [detok.flush()]
        assert all("\ufffd" not in d for d in deltas)
        streamed = "".join(deltas)
        # SentencePiece streams the continuation (a leading word boundary becomes a space)
        assert streamed.lstrip(" ") == text.lstrip(" ") if which == "llama2" else streamed == text


def test_finding_and_rejecting_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="looked for tokenizer.model"):
        Tokenizer.from_pretrained_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError):
        Tokenizer.from_pretrained_dir(tmp_path)
