"""Tokenizer files for the demo checkpoints: Meta's real Llama 3 tokenizer, and a small Llama-2-style
SentencePiece model trained here (Meta's Llama 2 tokenizer is not redistributable through a package)."""
from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

from .errors import TokenizerError

_WORDS = """the of and to in is was for on that with as by at from his her it an were are which this be or has
had not but first one their its new after who they have two been other all during also into more time when
there would only can some most years over later three many may where people then about year between city
serve model cluster replica token request stream cache prefix batch schedule shard pipeline tensor parallel
llama herd ray node graph memory engine block kernel attention layer weight sample decode prompt chat answer
question hello world good morning thank you please what how why because should could language learning data
""".split()
_MULTILINGUAL = [
    "日本語のテキストも正しく扱えます。", "こんにちは、世界！", "Ceci est une phrase en français, avec des accents: é è à ç.",
    "Das ist ein deutscher Satz mit Umlauten: ä ö ü ß.", "Это предложение на русском языке.",
    "这是一个中文句子。", "Emoji test 😀🚀🦙 done.", "def f(x):\n\treturn x * 2  # code\n", "for (int i = 0; i < n; ++i) {}",
]


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "." for _ in range(n_lines)]
    return lines + _MULTILINGUAL * 20


def build_llama2_sentencepiece(out_path: str | Path, vocab_size: int = 2000) -> Path:
    """Train a small BPE SentencePiece model with Llama 2's conventions: <unk>=0, <s>=1, </s>=2, byte fallback,
    no pad. Deterministic (fixed corpus, one thread)."""
    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        num_threads=1, split_digits=True, add_dummy_prefix=True, hard_vocab_limit=False,
        allow_whitespace_only_pieces=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model as shipped inside the `llama-models` package."""
    try:
        import llama_models
    except ImportError:
        raise TokenizerError("the llama-models package (Meta's Llama 3 tokenizer) is not installed") from None
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"{path}: Meta's Llama 3 tokenizer.model is missing from llama-models")
    return path
