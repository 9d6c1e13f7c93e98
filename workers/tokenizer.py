"""Llama tokenizers without `tokenizers`/`transformers` at run time.

`Tokenizer.from_file` recognises the three files Llama checkpoints ship:
- a SentencePiece model (Llama 2 `tokenizer.model`, a protobuf),
- a tiktoken BPE file (Llama 3 `tokenizer.model`: lines of `base64(token) rank`),
- a Hugging Face `tokenizer.json` of a Llama 3 model (byte-level BPE; its vocabulary becomes tiktoken ranks).
Text inside a prompt is never parsed as special tokens ("<|eot_id|>" typed by a user stays plain text).

Streaming: `IncrementalDetokenizer` turns generated ids into text deltas over *bytes*, holding back an
incomplete UTF-8 sequence until the next token completes it, so a client never sees half a character.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Sequence

from .chat_template import ChatTemplate, Llama2ChatTemplate, Llama3ChatTemplate
from .errors import TokenizerError

# Meta's Llama 3 pre-tokenizer pattern (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/=]+ \d+$")


class Tokenizer:
    """Common interface over the SentencePiece and tiktoken back ends."""

    kind: str          # "sentencepiece" | "tiktoken"
    bos_id: int
    eos_id: int
    stop_ids: frozenset[int]
    vocab_size: int
    chat: ChatTemplate

    @property
    def chat_format(self) -> str:
        return self.chat.name

    # ---- loading -----------------------------------------------------------------------------------
    @staticmethod
    def from_file(path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        if path.suffix == ".json":
            return TiktokenTokenizer.from_hf_json(path)
        with open(path, "rb") as f:
            head = f.readline().strip()
        if _TIKTOKEN_LINE.match(head):
            return TiktokenTokenizer.from_bpe_file(path)
        return SentencePieceTokenizer(path)

    @staticmethod
    def from_pretrained_dir(path: str | Path) -> "Tokenizer":
        root = Path(path)
        candidates = ["tokenizer.model", "tokenizer.json", "original/tokenizer.model"]
        for name in candidates:
            if (root / name).is_file():
                return Tokenizer.from_file(root / name)
        raise TokenizerError(f"{root}: no tokenizer found (looked for {', '.join(candidates)})")

    # ---- interface -----------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""
        return self.token_bytes_of(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to text (b"" for special tokens)."""
        raise NotImplementedError

    def token_bytes_of(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.chat.encode(self, messages, add_generation_prompt)


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001 - sentencepiece raises bare OSError/RuntimeError
            raise TokenizerError(f"{path}: not a SentencePiece or tiktoken tokenizer ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.stop_ids = frozenset({self.eos_id})
        self.chat = Llama2ChatTemplate()
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # byte-fallback pieces look like <0xE3>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, name: str, ranks: dict[bytes, int], specials: dict[str, int]):
        import tiktoken
        self.encoding = tiktoken.Encoding(name=name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.special_tokens = specials
        self._special_ids = frozenset(specials.values())
        self.vocab_size = len(ranks) + len(specials)
        try:
            self.bos_id = specials["<|begin_of_text|>"]
            self.eos_id = specials["<|end_of_text|>"]
        except KeyError as e:
            raise TokenizerError(f"{name}: missing Llama 3 special token {e}") from None
        self.stop_ids = frozenset(specials[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>") if t in specials)
        self.chat = Llama3ChatTemplate()

    @classmethod
    def from_bpe_file(cls, path: Path) -> "TiktokenTokenizer":
        ranks: dict[bytes, int] = {}
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        n = len(ranks)
        names = LLAMA3_NAMED_SPECIALS + [f"<|reserved_special_token_{2 + i}|>"
                                         for i in range(LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIALS))]
        return cls(path.name, ranks, {t: n + i for i, t in enumerate(names)})

    @classmethod
    def from_hf_json(cls, path: Path) -> "TiktokenTokenizer":
        try:
            data = json.loads(path.read_text())
            vocab: dict[str, int] = data["model"]["vocab"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None
        if data["model"].get("type") != "BPE":
            raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json files (Llama 3) are supported")
        decoder = _unicode_to_bytes()
        try:
            ranks = {bytes(decoder[c] for c in token): rank for token, rank in vocab.items()}
        except KeyError:
            raise TokenizerError(f"{path}: vocabulary is not byte-level BPE (a Llama 2 tokenizer.json? "
                                 "use its tokenizer.model)") from None
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t["id"] not in ranks.values()}
        return cls(path.name, ranks, specials)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # disallowed_special=() : special-token text in user input is encoded as ordinary text.
        ids = self.encoding.encode(text, allowed_special=set(), disallowed_special=())
        return [self.bos_id] + ids if bos else ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_ids or not 0 <= token_id < self.vocab_size:
            return b""
        return self.encoding.decode_single_token_bytes(token_id)

    def token_bytes_of(self, ids: Sequence[int]) -> bytes:
        return self.encoding.decode_bytes([i for i in ids if i not in self._special_ids and 0 <= i < self.vocab_size])


def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class IncrementalDetokenizer:
    """Text deltas for a growing list of generated ids, never splitting a UTF-8 character.

    The streamed text is the *continuation* of the prompt: a SentencePiece piece "▁Hello" streams as
    " Hello" (what appending to the prompt gives, as vLLM streams), where `decode(output_ids)` on its own
    would drop that first space. Special tokens (eos, eot, ...) contribute no text.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._pending = b""

    def add(self, token_id: int) -> str:
        self._pending += self.tokenizer.token_bytes(token_id)
        cut = _complete_utf8_prefix(self._pending)
        text, self._pending = self._pending[:cut].decode("utf-8", errors="replace"), self._pending[cut:]
        return text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end becomes U+FFFD)."""
        text, self._pending = self._pending.decode("utf-8", errors="replace"), b""
        return text


def _complete_utf8_prefix(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a multi-byte UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0xC0 == 0x80:      # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:          # ASCII
            return n
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n if back >= need else n - back
    return n  # only continuation bytes (invalid UTF-8): let the decoder replace them
