"""Large parts of an HTTP response written as JSON text off the ingress's event loop, then spliced in.

One ingress replica streams every request's tokens from one event loop. A 16k-token prompt's
`prompt_logprobs` with its top 20 is 336k entries: building vLLM's shape (a dict per position, each token's
text decoded) took 0.71 s and json.dumps of its 20 MB 0.37 s, all on that loop, every other stream paused
(2026-12-03, a probe of the code before this module); a 32k-token answer's logprobs with their top 20 twice
that. A worker thread alone would not help the dump: json's C encoder holds the GIL for the whole call. So such
a part is written one position at a time (each a short json.dumps, the loop gets its turns between them) in a
worker thread when large (past cluster.off_loop's size), and stands in the response as a `RawJson`, which
`dumps` replaces by its text. Small parts stay lists, built inline: a streamed chunk's few tokens.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any, Callable, Iterable, Union

from cluster.off_loop import OFF_LOOP_CHARS

# About how many characters of JSON one entry takes ("12345":{"logprob":...}), to compare with OFF_LOOP_CHARS.
CHARS_PER_ENTRY = 48


class RawJson:
    """JSON text to be placed as it is where this object stands in a response (see `dumps`), kept as the pieces
    it was written in: joined once, with the rest of the response (each copy of a 47 MB text is ~15 ms of the
    event loop)."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[str]):
        self.parts = parts

    @property
    def text(self) -> str:
        return "".join(self.parts)


def dumps(obj: Any, *, ensure_ascii: bool = True, allow_nan: bool = True) -> str:
    """json.dumps(obj) (compact separators), each RawJson in it written as its text."""
    raws: list[RawJson] = []
    nonce: list[str] = []   # drawn at the first RawJson only: most responses (every streamed chunk) have none

    def placeholder(value: Any) -> str:
        if not isinstance(value, RawJson):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        if not nonce:
            nonce.append(secrets.token_hex(8))
        raws.append(value)
        # A NUL (written \u0000) and a random nonce: no string of the response can be written the same way.
        return f"\0raw{len(raws) - 1}:{nonce[0]}"

    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=ensure_ascii, allow_nan=allow_nan,
                      default=placeholder)
    if not raws:
        return text
    pieces: list[str] = []
    for i, raw in enumerate(raws):   # the placeholders come in the order they were written
        before, text = text.split(f'"\\u0000raw{i}:{nonce[0]}"', 1)
        pieces.append(before)
        pieces += raw.parts
    pieces.append(text)
    return "".join(pieces)


async def json_array(items: Iterable, count: int, item_json: Callable[[Any], Any]) -> Union[list, RawJson]:
    """item_json(item) for each item: a list when `count` (how many entries the items hold, e.g. logprobs with
    their top-N) is small, else the JSON array's text written in a worker thread, one item at a time."""
    if count * CHARS_PER_ENTRY <= OFF_LOOP_CHARS:
        return [item_json(item) for item in items]

    def write() -> RawJson:
        one = json.JSONEncoder(separators=(",", ":")).encode
        parts = ["["]
        for item in items:
            parts += (one(item_json(item)), ",")
        if len(parts) > 1:
            parts[-1] = "]"     # in place of the last comma
        else:
            parts.append("]")
        return RawJson(parts)

    return await asyncio.to_thread(write)
