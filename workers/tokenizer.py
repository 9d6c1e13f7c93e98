"""Llama tokenizers without `tokenizers`/`transformers` at run time.

`Tokenizer.from_file` recognises, by content, the three files Llama checkpoints ship:
- a SentencePiece model (Llama 2 `tokenizer.model`, a protobuf)            -> kind "sentencepiece", chat "llama2"
- a tiktoken BPE file (Llama 3 `tokenizer.model`: lines `base64 rank`)     -> kind "tiktoken", chat "llama3"
- a Hugging Face `tokenizer.json` of a Llama 3 model (byte-level BPE)      -> kind "tiktoken", chat "llama3"

Decisions every caller should know:
- `encode` never parses special-token text: a user who types "<|eot_id|>" or "</s>" gets those characters as
  ordinary text (Meta's `allowed_special=set(), disallowed_special=()`), so nobody can forge a turn boundary.
  Only the chat formats insert special ids: the built-in ones (chat_template.py) by id, a checkpoint's Jinja
  template (jinja_template.py) through `encode_with_special_tokens` on the text the template itself wrote,
  never on the user's strings. `encode` never appends eos.
- A checkpoint folder whose tokenizer_config.json (or chat_template.jinja) has a chat template uses it
  (`chat_format` "jinja"); otherwise the built-in Meta format of the tokenizer's family.
- `decode` and the streaming detokenizer leave special tokens out (skip_special_tokens behaviour): bos, eos,
  <|eot_id|>, headers... contribute "" to text. SentencePiece's <unk> keeps sentencepiece's own surface " ⁇ ".
- `IncrementalDetokenizer` streams *the text the generated ids add to the prompt*; see its docstring.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from .chat_template import ChatTemplate, Llama2ChatTemplate, Llama3ChatTemplate, validate_messages
from .errors import TokenizerError

# ---- Llama 3 constants, as in Meta's llama_models/llama3/tokenizer.py ----------------------------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256
_LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",  # end of message (a tool call follows)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>", "<|image|>",
]
# The special tokens follow the BPE ranks in this order: <|begin_of_text|> = 128000 ... <|image|> = 128011, then
# <|reserved_special_token_2|> ... up to 256 specials in all.
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED_SPECIALS + [
    f"<|reserved_special_token_{2 + i}|>"
    for i in range(LLAMA3_NUM_RESERVED_SPECIAL_TOKENS - len(_LLAMA3_NAMED_SPECIALS))
]
# tiktoken's Rust core panics (stack overflow) on very long inputs and very long runs of (non-)whitespace;
# Meta encodes in chunks cut at these limits, and so do we, so long prompts give Meta's exact ids.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space

_TIKTOKEN_FIRST_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*[ \t]+\d+(\r?\n|$)")


def _replace_each_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    """Decode error handler: one U+FFFD per invalid byte, as sentencepiece's decoder does (Python's "replace"
    folds a truncated sequence such as E3 81 into one U+FFFD; sentencepiece gives one per byte)."""
    return "\ufffd", err.start + 1


codecs.register_error("herd_replace_each_byte", _replace_each_byte)


class Tokenizer:
    """One Llama tokenizer: encode / decode, chat formats, and what the engine needs (bos, stop ids, vocab).

    Build it with `Tokenizer.from_file(path)` or `Tokenizer.from_pretrained_dir(checkpoint_dir)`.
    """

    # Set by the subclasses' __init__; read through the properties below.
    _kind: str
    _bos_id: int
    _eos_id: int
    _stop_ids: frozenset[int]
    _vocab_size: int
    chat: ChatTemplate
    special_tokens: dict[str, int]     # name -> id of every special (control) token
    utf8_errors: str                   # how invalid UTF-8 is decoded, as the reference decoder does

    # ---- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def from_file(path: str | Path) -> "Tokenizer":
        """Load a tokenizer file, recognised by its content (not its name)."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file")
        with open(path, "rb") as f:
            head = f.read(4096)
        if head.lstrip()[:1] == b"{":
            return TiktokenTokenizer.from_hf_tokenizer_json(path)
        if _TIKTOKEN_FIRST_LINE.match(head):
            return TiktokenTokenizer.from_tiktoken_file(path)
        return SentencePieceTokenizer(path)

    TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")

    @staticmethod
    def from_pretrained_dir(path: str | Path) -> "Tokenizer":
        """The tokenizer of a checkpoint folder: the first of TOKENIZER_FILES that exists (Hugging Face Llama 2
        folders ship tokenizer.model beside a tokenizer.json; the SentencePiece model is the reference)."""
        root = Path(path)
        tok = Tokenizer.from_file(Tokenizer.file_in(root))
        tok._configure_from_folder(root)
        return tok

    @staticmethod
    def file_in(root: Path) -> Path:
        """The tokenizer file from_pretrained_dir loads from checkpoint folder `root` (found by name, not read)."""
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a checkpoint folder")
        for name in Tokenizer.TOKENIZER_FILES:
            if (root / name).is_file():
                return root / name
        raise TokenizerError(f"{root}: no tokenizer found (looked for {', '.join(Tokenizer.TOKENIZER_FILES)})")

    # ---- what the rest of herd reads -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """"sentencepiece" (Llama 2) or "tiktoken" (Llama 3)."""
        return self._kind

    @property
    def chat_format(self) -> str:
        """"llama2" or "llama3" (Meta's built-in formats), or "jinja" (the checkpoint's own chat template)."""
        return self.chat.name

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end a generation: eos, and <|eot_id|> / <|eom_id|> where the vocabulary has them."""
        return self._stop_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids (regular + special). A model's embedding may be larger (padded)."""
        return self._vocab_size

    # ---- the interface -------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Ids of `text`, special-token text encoded as plain text; bos first if asked; never eos."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        # A lone surrogate (JSON "\ud800") cannot be UTF-8 encoded; it becomes U+FFFD as tiktoken does it.
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace") if _has_surrogate(text) else text
        ids = self._encode_plain(text)
        return [self._bos_id] + ids if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special tokens (and ids outside the vocabulary) contribute nothing."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (SentencePiece's "▁" as a space; b"" for special tokens).
        Several tokens may be needed to make a whole UTF-8 character."""
        raise NotImplementedError

    def token_text(self, token_id: int) -> str:
        """decode([token_id]), remembered (at most one entry per id of the vocabulary): logprobs name every token
        and its top-N this way, 336k of them for a 16k-token prompt's top 20 (2 us each decoded, 0.7 s)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._one_token_text(token_id)
        return text

    def _one_token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    @cached_property
    def _token_texts(self) -> dict[int, str]:
        return {}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> list[int]:
        """Token ids of a dialog of OpenAI-shaped messages (chat_template.validate_messages: roles system, user,
        assistant, tool; text content; assistant tool_calls) in the model's chat format, ending with the
        assistant's turn opened when `add_generation_prompt`. `tools` (OpenAI tool definitions, see
        tool_calls.validate_tools) are rendered as the format expects; pass None for tool_choice "none".
        Bad messages, tools or a template that fails are InvalidRequestError."""
        from .tool_calls import validate_tools

        checked = validate_messages(messages)
        return self.chat.encode(self, checked, add_generation_prompt, validate_tools(tools) if tools else None)

    @property
    def chat_control_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens a chat template's text may write (the special tokens)."""
        return self.special_tokens

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of `text` in which special-token text (`chat_control_tokens`) is the special token; no bos added.
        Only for text a chat template wrote (jinja_template.encode_marked keeps the user's strings plain)."""
        controls = self.chat_control_tokens
        ids: list[int] = []
        for i, piece in enumerate(_special_token_pattern(tuple(controls)).split(text)):
            if i % 2:
                ids.append(controls[piece])
            elif piece:
                ids += self._encode_segment(piece, at_start=(i == 0))
        return ids

    def _encode_segment(self, text: str, at_start: bool) -> list[int]:
        """Plain ids of text between special tokens (`at_start`: it begins the whole text)."""
        return self.encode(text, bos=False)

    def _configure_from_folder(self, root: Path) -> None:
        """What the checkpoint folder adds to its tokenizer file: its own chat template, if it has one."""
        from .jinja_template import load_chat_template

        template = load_chat_template(root)
        if template is not None:
            self.chat = template

    # ---- for subclasses and the streaming detokenizer -----------------------------------------------------------
    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _stream_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        """(bytes this token adds to the text, whether the text is still "at its start" after it). Only
        SentencePiece cares about the start: its decoder drops the dummy-prefix space of the first word."""
        return self.token_bytes(token_id), False

    def _ends_byte_run(self, token_id: int) -> bool:
        """Whether this token closes an unfinished character (which then shows as U+FFFD) even though it adds no
        bytes. tiktoken decodes the bytes of the regular tokens as one string: no."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} kind={self.kind} chat={self.chat_format} vocab={self.vocab_size}>"


class SentencePieceTokenizer(Tokenizer):
    """Llama 2: a SentencePiece BPE model with byte fallback; <unk>=0, <s>=1, </s>=2."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # noqa: BLE001 - sentencepiece raises bare OSError/RuntimeError
            raise TokenizerError(f"{path}: not a SentencePiece model, a tiktoken BPE file or a tokenizer.json "
                                 f"({type(e).__name__}: {e})") from None
        sp = self.sp
        self._kind = "sentencepiece"
        self._vocab_size = sp.get_piece_size()
        self._bos_id, self._eos_id = sp.bos_id(), sp.eos_id()
        if self._bos_id < 0 or self._eos_id < 0:
            raise TokenizerError(f"{path}: SentencePiece model has no <s>/</s> pieces; not a Llama tokenizer")
        self._stop_ids = frozenset({self._eos_id})
        self.chat = Llama2ChatTemplate()
        self.special_tokens = {sp.id_to_piece(i): i for i in range(self._vocab_size) if sp.is_control(i)}
        self.utf8_errors = "herd_replace_each_byte"

        # Per-id bytes for streaming, mirroring sentencepiece's decoder (sentencepiece_processor.cc, Decode):
        # control pieces are invisible, <unk> shows the model's unk surface, <0xAB> pieces are raw bytes, and
        # other pieces are their text with "▁" as a space.
        unk_surface = sp.decode([sp.unk_id()]).encode() if sp.unk_id() >= 0 else b""
        self._bytes: list[bytes] = []
        self._kinds: list[str] = []  # "control" | "unk" | "byte" | "piece"
        for i in range(self._vocab_size):
            if sp.is_control(i):
                self._bytes.append(b"")
                self._kinds.append("control")
            elif sp.is_unknown(i):
                self._bytes.append(unk_surface)
                self._kinds.append("unk")
            elif sp.is_byte(i):  # pieces look like <0xE3>
                self._bytes.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
                self._kinds.append("byte")
            else:
                self._bytes.append(sp.id_to_piece(i).replace(SPIECE_SPACE, " ").encode("utf-8"))
                self._kinds.append("piece")
        self._strips_first_space, self._strips_all_leading = self._probe_leading_space_rule()
        self.prefix_scheme = "first"  # see _encode_segment
        self._no_prefix_sp = None     # the same model without the dummy prefix, built on first use

    def _probe_leading_space_rule(self) -> tuple[bool, bool]:
        """Ask sentencepiece how it decodes the start of a text, rather than re-reading its normalizer spec.

        With add_dummy_prefix (Llama 2) "▁Hello" at the start decodes as "Hello": one leading "▁" of the first
        visible piece is dropped. With remove_extra_whitespaces, "▁"-only pieces keep being dropped while
        nothing has been written. Returns (drops one leading space, keeps dropping "▁" pieces)."""
        sp, pieces = self.sp, range(self._vocab_size)
        word = next((i for i in pieces if self._kinds[i] == "piece" and len(sp.id_to_piece(i)) > 1
                     and sp.id_to_piece(i).startswith(SPIECE_SPACE) and sp.id_to_piece(i)[1] != SPIECE_SPACE), None)
        if word is None:
            return False, False
        strips = not sp.decode([word]).startswith(" ")
        space = sp.piece_to_id(SPIECE_SPACE)
        keeps = strips and self._kinds[space] == "piece" and sp.id_to_piece(space) == SPIECE_SPACE and \
            sp.decode([space, word]) == sp.decode([word])
        return strips, keeps

    def _encode_plain(self, text: str) -> list[int]:
        # sentencepiece never matches control pieces ("<s>", "</s>") inside input text: they stay plain text.
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self._vocab_size])

    @property
    def chat_control_tokens(self) -> dict[str, int]:
        # transformers' LlamaTokenizer counts <unk> among its special (added) tokens, beside <s> and </s>.
        unk = self.sp.unk_id()
        return {**self.special_tokens, **({self.sp.id_to_piece(unk): unk} if unk >= 0 else {})}

    def _encode_segment(self, text: str, at_start: bool) -> list[int]:
        """Text between special tokens, as transformers' LlamaTokenizer splits it: its Metaspace pre-tokenizer
        puts the prefix space ("▁") before every segment (prepend_scheme "always", tokenizer_config `legacy:
        true`), only before the text's start ("first", the default), or nowhere ("never", `add_prefix_space:
        false`). Without the prefix, the model runs with SentencePiece's add_dummy_prefix switched off."""
        if self.prefix_scheme == "always" or (self.prefix_scheme == "first" and at_start):
            return self.encode(text, bos=False)
        if self._no_prefix_sp is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self.sp.serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            self._no_prefix_sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace") if _has_surrogate(text) else text
        return self._no_prefix_sp.encode(text)

    def _configure_from_folder(self, root: Path) -> None:
        super()._configure_from_folder(root)
        config = _tokenizer_config(root)
        if config.get("add_prefix_space") is False:
            self.prefix_scheme = "never"
        elif config.get("legacy") is True:
            self.prefix_scheme = "always"

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self._vocab_size else b""

    def _ends_byte_run(self, token_id: int) -> bool:
        # sentencepiece decodes each run of <0x..> pieces on its own: a control piece (</s>) between the bytes
        # of one character splits it into two U+FFFD-marked halves.
        return 0 <= token_id < self._vocab_size and self._kinds[token_id] == "control"

    def _stream_bytes(self, token_id: int, at_start: bool) -> tuple[bytes, bool]:
        if not 0 <= token_id < self._vocab_size:
            return b"", at_start
        kind, data = self._kinds[token_id], self._bytes[token_id]
        if kind == "control":
            return b"", at_start
        if kind != "piece" or not (at_start and self._strips_first_space):
            return data, at_start and not data
        if data.startswith(b" "):  # the dummy-prefix space of the first word
            data = data[1:]
            return data, self._strips_all_leading and not data
        return data, False


class TiktokenTokenizer(Tokenizer):
    """Llama 3: byte-level BPE run by tiktoken with Meta's pattern, plus Llama 3's special tokens."""

    def __init__(self, name: str, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int],
                 pattern: str = LLAMA3_PATTERN):
        import tiktoken

        missing = [t for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                               "<|eot_id|>") if t not in special_tokens]
        if missing:
            raise TokenizerError(f"{name}: not a Llama 3 tokenizer (no {', '.join(missing)} special token)")
        try:
            self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                              special_tokens=special_tokens)
        except Exception as e:  # noqa: BLE001 - a bad pattern or inconsistent ranks
            raise TokenizerError(f"{name}: tiktoken cannot use this vocabulary ({type(e).__name__}: {e})") from None
        self._kind = "tiktoken"
        self.special_tokens = dict(special_tokens)
        self._special_ids = frozenset(special_tokens.values())
        self._vocab_size = max(max(mergeable_ranks.values(), default=-1), max(special_tokens.values())) + 1
        # Ids that are neither a rank nor a special token (none in Meta's files); tiktoken cannot decode them.
        self._unused_ids = frozenset(range(self._vocab_size)) - self._special_ids - set(mergeable_ranks.values()) \
            if len(mergeable_ranks) + len(special_tokens) != self._vocab_size else frozenset()
        self._bos_id = special_tokens["<|begin_of_text|>"]
        self._eos_id = special_tokens["<|end_of_text|>"]
        self._stop_ids = frozenset(special_tokens[t] for t in ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
                                   if t in special_tokens)
        self.chat = Llama3ChatTemplate()
        self.utf8_errors = "replace"  # what tiktoken's own decode() uses

    @classmethod
    def from_tiktoken_file(cls, path: str | Path) -> "TiktokenTokenizer":
        """Meta's Llama 3 `tokenizer.model`: one `base64(token bytes) rank` per line; the 256 special tokens
        are not in the file, they follow the last rank in Meta's fixed order (LLAMA3_SPECIAL_TOKENS)."""
        path = Path(path)
        ranks: dict[bytes, int] = {}
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise TokenizerError(f"{path}:{lineno}: not a tiktoken BPE line (want 'base64 rank')") from None
        if sorted(ranks.values()) != list(range(len(ranks))):
            raise TokenizerError(f"{path}: tiktoken ranks are not 0..{len(ranks) - 1} with each once")
        n = len(ranks)
        return cls(path.name, ranks, {token: n + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)})

    @classmethod
    def from_hf_tokenizer_json(cls, path: str | Path) -> "TiktokenTokenizer":
        """A Hugging Face `tokenizer.json` of a Llama 3 model.

        Its `model.vocab` maps byte-level strings (GPT-2's bytes_to_unicode alphabet: every byte has a printable
        stand-in character) to ids; mapping each character back to its byte gives tiktoken's mergeable ranks.
        For Llama 3 the vocabulary ids *are* the merge priorities (the file was converted from tiktoken), so
        tiktoken's rank-ordered merging reproduces the `merges` list without reading it. `added_tokens` are the
        special tokens. The split pattern is the file's own when it has one (Llama 3's), else Meta's."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            model = data["model"]
            vocab: dict[str, int] = model["vocab"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise TokenizerError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
        if model.get("type") != "BPE" or not isinstance(vocab, dict):
            raise TokenizerError(f"{path}: only byte-level BPE tokenizer.json files (Llama 3) are supported")
        to_byte = _byte_level_alphabet()
        try:
            ranks = {bytes(to_byte[c] for c in token): rank for token, rank in vocab.items()}
        except KeyError:
            raise TokenizerError(f"{path}: vocabulary is not byte-level BPE (a Llama 2 tokenizer.json? load its "
                                 "tokenizer.model instead)") from None
        regular_ids = set(ranks.values())
        try:
            specials = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []
                        if t["id"] not in regular_ids}
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"{path}: malformed added_tokens ({type(e).__name__}: {e})") from None
        return cls(path.name, ranks, specials, _split_pattern(data.get("pre_tokenizer")) or LLAMA3_PATTERN)

    def _encode_plain(self, text: str) -> list[int]:
        # encode_ordinary: special-token text is ordinary text (Meta's allowed_special=set(), disallowed=()).
        ids: list[int] = []
        for piece in _meta_chunks(text):
            ids += self.encoding.encode_ordinary(piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.encoding.decode_bytes([i for i in ids if self._is_regular(i)]).decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id) if self._is_regular(token_id) else b""

    def _one_token_text(self, token_id: int) -> str:
        # decode([id]) without tiktoken's decode_bytes, which releases and retakes the GIL at every call: a thread
        # writing a long answer's logprobs made ~10^5 such calls and kept the ingress's event loop from the GIL
        # for 0.2-0.4 s at a time (CPython's waiter sees the GIL change hands and never asks for it).
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def _is_regular(self, token_id: int) -> bool:
        return 0 <= token_id < self._vocab_size and token_id not in self._special_ids and \
            token_id not in self._unused_ids


class IncrementalDetokenizer:
    """Text deltas for one sequence's generated ids, never splitting a UTF-8 character.

    Tokens are turned into bytes (a SentencePiece <0xE3> piece, a tiktoken token holding half an emoji) and
    fed to an incremental UTF-8 decoder: bytes of an unfinished character are held back until a later token
    completes it, so no delta ever carries a partial character or a U+FFFD that the full text would not have.
    `flush()` at the end returns what is still held (an unfinished character at the very end becomes U+FFFD,
    exactly as in `decode`).

    What is streamed is the text the generated ids *add to the prompt's text*:
        tokenizer.decode(prompt_ids) + "".join(deltas) + flush() == tokenizer.decode(prompt_ids + generated_ids)
    (whenever the prompt's text ends on a whole character), and with no prompt (or a prompt of special tokens
    only, such as [bos]) the deltas add up to `tokenizer.decode(generated_ids)`. For tiktoken the two coincide.
    For SentencePiece they differ in one place: a first generated piece "▁time" after the prompt "Once upon a"
    streams as " time", so appending the stream to the prompt reads right, while decode(generated_ids) alone
    drops that space (sentencepiece removes the dummy-prefix space of a text's first word); Llama 2 chat answers
    therefore start with the space the model put after "[/INST]", as vLLM streams them too.

    Special tokens (bos, eos, <|eot_id|>, ...) add "" (skip_special_tokens behaviour), as in `decode`.

    A prompt given as ids may end inside a character: generated bytes that finish it stream it whole; otherwise
    its bytes are dropped (the prompt's text shows them as U+FFFD), so no delta ever carries a U+FFFD made of
    prompt bytes, and prompt text + stream == decode(prompt + generated) holds then too.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=tokenizer.utf8_errors)
        # SentencePiece's leading-space state after the prompt: still "at the start" only while the prompt has
        # written nothing (usually it stops at the first token after bos, so this loop is short).
        self._at_start = True
        for token_id in prompt_token_ids:
            _, self._at_start = tokenizer._stream_bytes(token_id, self._at_start)
            if not self._at_start:
                break
        # A prompt given as ids may end inside a character; the generated ids may finish it. Until a generated
        # byte arrives, what the decoder holds is the prompt's alone.
        self._decoder.decode(_trailing_bytes(tokenizer, prompt_token_ids))
        self._prompt_bytes = self._decoder.getstate()[0]

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is unfinished, or for a special token)."""
        data, self._at_start = self.tokenizer._stream_bytes(token_id, self._at_start)
        if data:
            if self._prompt_bytes:
                self._drop_prompt_bytes_unless_continued(data)
            return self._decoder.decode(data)
        return self.flush() if self.tokenizer._ends_byte_run(token_id) else ""

    def flush(self) -> str:
        """Whatever is still held back, as `decode` would show it; the detokenizer is then empty."""
        if self._prompt_bytes:   # only the prompt's: its own text shows them, the output must not
            self._decoder.reset()
            self._prompt_bytes = b""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text

    def _drop_prompt_bytes_unless_continued(self, data: bytes) -> None:
        """The first generated bytes either go on with the prompt's unfinished character (then the stream shows
        that character whole) or not: then that character was the prompt's, which its own text already shows as
        U+FFFD, and the output drops it rather than start with a U+FFFD that no generated byte made (an
        output constrained to a choice or a JSON schema must be exactly that)."""
        lead = self._prompt_bytes[0]   # a valid start (the decoder would have replaced an invalid one)
        missing = (2 if lead < 0xE0 else 3 if lead < 0xF0 else 4) - len(self._prompt_bytes)
        probe = codecs.getincrementaldecoder("utf-8")(errors="strict")
        probe.decode(self._prompt_bytes)
        try:
            probe.decode(data[:missing])
        except UnicodeDecodeError:
            self._decoder.reset()
        self._prompt_bytes = b""


# ---- helpers ---------------------------------------------------------------------------------------------------

def _tokenizer_config(root: Path) -> dict:
    try:
        config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a malformed file is reported by jinja_template.load_chat_template
    return config if isinstance(config, dict) else {}


@lru_cache(maxsize=8)
def _special_token_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """Splits text at special-token text (longest first), keeping the tokens: [text, token, text, ...]."""
    return re.compile("(" + ("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)") + ")")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _trailing_bytes(tokenizer: Tokenizer, ids: Sequence[int]) -> bytes:
    """The last few bytes of `ids`' text: enough to hold the start of an unfinished character (at most 3)."""
    tail = b""
    for token_id in reversed(ids):
        if tokenizer._ends_byte_run(token_id):
            break
        tail = tokenizer.token_bytes(token_id) + tail
        if len(tail) >= 4:
            break
    return tail


def _meta_chunks(text: str) -> Iterator[str]:
    """Meta's cut of long text: 400k-character chunks, and no run of whitespace or of non-whitespace longer than
    25k characters (llama_models/llama3/tokenizer.py). Short text is passed through whole."""
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start:start + TIKTOKEN_MAX_ENCODE_CHARS]
        if len(chunk) <= MAX_NO_WHITESPACES_CHARS:
            yield chunk
            continue
        run_len, run_is_space, cut = 0, chunk[0].isspace(), 0
        for i, ch in enumerate(chunk):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run_len, run_is_space = 1, is_space
            else:
                run_len += 1
                if run_len > MAX_NO_WHITESPACES_CHARS:
                    yield chunk[cut:i]
                    cut, run_len = i, 1
        yield chunk[cut:]


def _byte_level_alphabet() -> dict[str, int]:
    """Character -> byte of GPT-2's bytes_to_unicode table, which byte-level BPE vocabularies are written in:
    printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


def _split_pattern(pre_tokenizer: dict | None) -> str | None:
    """The regex of a tokenizer.json's Split pre-tokenizer (Llama 3 has exactly one), if any."""
    if not isinstance(pre_tokenizer, dict):
        return None
    if pre_tokenizer.get("type") == "Sequence":
        for inner in pre_tokenizer.get("pretokenizers") or []:
            if (found := _split_pattern(inner)) is not None:
                return found
        return None
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern") or {}
        return pattern.get("Regex") if isinstance(pattern, dict) else None
    return None
