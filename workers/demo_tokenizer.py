"""Tokenizer files for the demo checkpoints.

- Llama 3 shapes get Meta's real `tokenizer.model`, which the `llama-models` package ships.
- Llama 2 shapes get a small SentencePiece model trained here, the way Meta's Llama 2 tokenizer was made (BPE,
  byte fallback, digits split, <unk>=0 <s>=1 </s>=2, no pad): Meta's own is not redistributable through a
  package, and a real trained model exercises the same code paths (byte pieces, "▁" spaces, control pieces).
"""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

from .errors import TokenizerError

# The training text: a few KB written for herd, English first (the demo's prompts are English), then other
# scripts, emoji and code so that every script the tests stream has pieces, and byte fallback covers the rest.
DEMO_CORPUS = """\
Once upon a time, in a valley between two mountains, there lived a herd of llamas.
Every morning the llamas walked down to the river to drink, and every evening they walked back up the hill.
The youngest llama asked the oldest one why they always took the same path. The old llama thought for a while.
"Because the path is already there," she said, "and a path that is already there costs nothing to walk."
The young llama was not satisfied with that answer, so the next morning she tried a different way.
She found a field of yellow flowers, a small lake full of fish, and a cave where the wind sang a low song.
When she came home late that night, the herd was worried, but she told them about everything she had seen.
The next day, half of the herd followed her new path, and the other half kept to the old one.
Both paths reached the river. Both groups drank the same water. The story does not say which path was better.

A serving cluster is a little like that herd. Requests arrive one after another, and each one asks a model
to continue a piece of text. The scheduler decides which requests run together in the next batch.
Short prompts finish quickly; long prompts are split into chunks so that they do not block the others.
The cache keeps the keys and values of every token that was already processed, in blocks of sixteen tokens.
When two requests share the same beginning, such as a long system prompt, they can share the same blocks.
The router sends a request to the replica that already holds the longest part of its prompt in memory.
If that replica is busy, the request goes to the least loaded one instead, and the cache fills up again.
Large models are cut into pieces: tensor parallel shards split every layer across the GPUs of one node,
and pipeline parallel stages place groups of layers on different nodes, passing activations between them.
Small models run as whole replicas, and the autoscaler adds or removes replicas as the load changes.

Questions people often ask about the weather, about cooking, and about numbers:
What is the temperature today? It is 21 degrees in the morning and 27 degrees in the afternoon.
How long should I boil an egg? About 7 minutes for a soft yolk, 10 minutes for a hard one.
How many seconds are there in a day? There are 86400 seconds in a day, and 3600 in an hour.
Please write a short poem about the sea. The sea is wide, the sea is deep, it sings the sailors all to sleep.
Can you explain what a token is? A token is a small piece of text: a word, part of a word, or a symbol.
Thank you very much for your help! You are welcome; have a good day and good luck with your project.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
In 1969, people walked on the Moon for the first time; in 2024, millions of people talk to language models.

def greet(name: str) -> str:
\t\"\"\"Return a friendly greeting.\"\"\"
\tif not name:
\t\treturn "Hello, world!"
\treturn f"Hello, {name}!"

for (int i = 0; i < n; ++i) {
    total += values[i] * weights[i];
}
SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name ORDER BY 2 DESC;
{"model": "llama", "prompt": "Once upon a time", "max_tokens": 64, "temperature": 0.7}

Français : Il était une fois un troupeau de lamas qui vivait au pied des montagnes. Ça coûte 12,50 € à peine.
Le garçon a préféré le gâteau à la crème ; sa sœur, elle, a choisi une tarte aux pommes très sucrée.
Deutsch: Es war einmal eine Herde Lamas, die an einem Fluss lebte. Die Straße ist schön, aber sehr lang.
Über den Bergen schläft die Sonne; die Tiere müssen früh aufstehen, um frisches Gras zu finden.
Español: Había una vez una manada de llamas que vivía junto al río. ¿Dónde está la biblioteca? ¡Qué día!
Português: Era uma vez um rebanho de lhamas. A canção do coração não tem fim, não é?
Italiano: C'era una volta un gregge di lama che viveva vicino al fiume. Perché la città è così bella?
Русский: Жили-были ламы в долине между двумя горами. Каждое утро они ходили к реке пить воду.
Ελληνικά: Μια φορά κι έναν καιρό ζούσε ένα κοπάδι λάμα σε μια κοιλάδα ανάμεσα σε δύο βουνά.
日本語：昔々、二つの山の間の谷に、ラマの群れが住んでいました。毎朝、ラマたちは川へ水を飲みに行きました。
日本語のテキストも正しく扱えます。こんにちは、世界！今日はいい天気ですね。
中文：从前，在两座山之间的山谷里，住着一群羊驼。每天早上，它们都会去河边喝水。这是一个中文句子。
한국어: 옛날 옛적에 두 산 사이의 골짜기에 라마 무리가 살았습니다. 안녕하세요, 세계!
العربية: كان يا ما كان، قطيع من اللاما يعيش في وادٍ بين جبلين.
हिन्दी: एक समय की बात है, दो पहाड़ों के बीच एक घाटी में लामाओं का एक झुंड रहता था।
Emoji: 🦙 llamas 🦙🦙, rockets 🚀, smiles 😀😄, hearts ❤️, flags 🇯🇵 🇫🇷, and a thumbs up 👍🏽.
"""

# sentencepiece trainer flags matching Meta's Llama 2 tokenizer.model (its trainer_spec / normalizer_spec).
_LLAMA2_TRAINER_FLAGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
    character_coverage=1.0,  # keep every character of this small corpus as a piece; byte fallback does the rest
    max_sentence_length=4192,
)


def build_llama2_sentencepiece(out_path: str | Path, vocab_size: int = 1000) -> Path:
    """Train a Llama-2-style SentencePiece BPE model on DEMO_CORPUS and write it to `out_path`.

    Deterministic (a fixed corpus in a fixed order, one thread: the same bytes on every run) and quick (well
    under a second). `vocab_size` must leave room for the 3 control pieces, the 256 byte pieces and every
    character of the corpus (about 600 in all). Above roughly 3400 the small corpus runs out of merges and the
    trainer settles on fewer pieces (hard_vocab_limit=False): read the real size from
    `Tokenizer.from_file(path).vocab_size`."""
    import sentencepiece as spm

    lines = [line for line in DEMO_CORPUS.splitlines() if line.strip()]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, hard_vocab_limit=False,
            num_threads=1, minloglevel=2, **_LLAMA2_TRAINER_FLAGS)
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars. 500 vs 592."
        raise TokenizerError(f"cannot train the demo SentencePiece model with vocab_size={vocab_size}: {e}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    return out


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 `tokenizer.model` (tiktoken BPE) as shipped inside the `llama-models` package."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("Meta's Llama 3 tokenizer comes with the llama-models package, which is not installed "
                             "(pip install llama-models)")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise TokenizerError(f"{path}: Meta's Llama 3 tokenizer.model is missing from the llama-models package")
    return path
