"""Llama chat formats, token-exact with Meta's reference code.

- Llama 2 (`llama/generation.py` chat_completion): the system prompt is folded into the first user turn
  inside `<<SYS>>` markers; every completed user/assistant pair is its own `bos … eos` segment
  `[INST] user [/INST] answer `; the final user turn is `bos [INST] user [/INST]`.
- Llama 3 (`llama_models` ChatFormat): `<|begin_of_text|>`, then per message
  `<|start_header_id|>role<|end_header_id|>` + "\\n\\n" + content + `<|eot_id|>`, then the assistant header.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import InvalidRequestError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def _check(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InvalidRequestError("messages", f"message {i} must have role in {ROLES} and string content")
        if m["role"] == "system" and i != 0:
            raise InvalidRequestError("messages", "only the first message may be a system message")
    return messages


class ChatTemplate:
    name = "base"

    def encode(self, tok: "Tokenizer", messages: list[dict], add_generation_prompt: bool) -> list[int]:
        raise NotImplementedError


class Llama2ChatTemplate(ChatTemplate):
    name = "llama2"
    B_INST, E_INST = "[INST]", "[/INST]"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def encode(self, tok, messages, add_generation_prompt=True):
        dialog = list(_check(messages))
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise InvalidRequestError("messages", "a system message must be followed by a user message")
            dialog = [{"role": dialog[1]["role"],
                       "content": self.B_SYS + dialog[0]["content"] + self.E_SYS + dialog[1]["content"]}] + dialog[2:]
        for i, m in enumerate(dialog):
            if m["role"] != ("user" if i % 2 == 0 else "assistant"):
                raise InvalidRequestError("messages", "roles must alternate user/assistant (after an optional system)")
        ids: list[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            ids += tok.encode(f"{self.B_INST} {prompt['content'].strip()} {self.E_INST} {answer['content'].strip()} ",
                              bos=True) + [tok.eos_id]
        if dialog[-1]["role"] == "user":
            ids += tok.encode(f"{self.B_INST} {dialog[-1]['content'].strip()} {self.E_INST}", bos=True)
        elif add_generation_prompt:
            raise InvalidRequestError("messages", "the last message must be from the user")
        return ids


class Llama3ChatTemplate(ChatTemplate):
    name = "llama3"

    def encode(self, tok, messages, add_generation_prompt=True):
        sp = tok.special_tokens
        ids = [sp["<|begin_of_text|>"]]

        def header(role: str) -> list[int]:
            return [sp["<|start_header_id|>"]] + tok.encode(role, bos=False) + [sp["<|end_header_id|>"]] + \
                tok.encode("\n\n", bos=False)

        for m in _check(messages):
            ids += header(m["role"]) + tok.encode(m["content"].strip(), bos=False) + [sp["<|eot_id|>"]]
        if add_generation_prompt:
            ids += header("assistant")
        return ids
