"""cluster/raw_json.py: large response parts written as JSON text off the event loop and spliced in; the OpenAI
routes' prompt_logprobs through it."""
from __future__ import annotations

import asyncio
import json
import threading

from cluster.off_loop import OFF_LOOP_CHARS
from cluster.openai_http import _json_response, _sse
from cluster.raw_json import CHARS_PER_ENTRY, RawJson, dumps, json_array


def test_raw_parts_are_spliced_where_they_stand_and_nothing_else_is_replaced():
    obj = {"a": RawJson(["[1,", '{"x":null}]']), "s": "\0raw0:0000", "list": [RawJson(["2"]), "é", 1.5],
           "nested": {"b": RawJson(['"t"'])}}
    text = dumps(obj)
    assert json.loads(text) == {"a": [1, {"x": None}], "s": "\0raw0:0000", "list": [2, "é", 1.5],
                                "nested": {"b": "t"}}
    assert "\\u00e9" in text and "é" in dumps(obj, ensure_ascii=False)
    plain = {"k": [1, "two", None], "v": {"x": -0.5}}
    assert dumps(plain) == json.dumps(plain, separators=(",", ":"))


def test_a_large_array_is_written_in_a_worker_thread_and_a_small_one_is_a_list_built_inline():
    written_on: list[int] = []

    def item(x: int) -> dict:
        written_on.append(threading.get_ident())
        return {str(x): {"logprob": -x / 7, "decoded_token": f"t{x}é"}}

    small_count = OFF_LOOP_CHARS // CHARS_PER_ENTRY - 1
    large_count = OFF_LOOP_CHARS // CHARS_PER_ENTRY + 1

    async def go():
        small = await json_array(range(small_count), small_count, item)
        inline = set(written_on)
        written_on.clear()
        large = await json_array(range(large_count), large_count, item)
        return threading.get_ident(), small, inline, large, set(written_on)

    loop_thread, small, small_threads, large, large_threads = asyncio.run(go())
    assert small_threads == {loop_thread} and loop_thread not in large_threads
    assert small == [item(x) for x in range(small_count)]
    assert isinstance(large, RawJson) and json.loads(large.text) == [item(x) for x in range(large_count)]
    empty = asyncio.run(json_array([], large_count, item))    # (a count that overstates: still an array)
    assert empty.text == "[]"


def test_openai_prompt_logprobs_keep_vllms_shape():
    """Per position None (the first) or {token_id: {logprob, decoded_token}}, the prompt's token first, then
    the top-N; the same in a streamed event and a whole response, long or short."""
    routes = _routes()
    for length in (3, 400):
        prompt = list(range(100, 100 + length))
        lps = [None] + [{"logprob": -1.0 - i, "top": [[7, -0.5], [i, -2.5]]} for i in range(1, length)]
        expected = [None] + [{str(prompt[i]): {"logprob": -1.0 - i, "decoded_token": f"<{prompt[i]}>"},
                              "7": {"logprob": -0.5, "decoded_token": "<7>"},
                              str(i): {"logprob": -2.5, "decoded_token": f"<{i}>"}} for i in range(1, length)]
        raw = asyncio.run(routes._prompt_logprobs(None, prompt, lps))
        event = _sse({"choices": [{"index": 0, "prompt_logprobs": raw}]})
        assert event.startswith("data: ") and event.endswith("\n\n")
        assert json.loads(event[len("data: "):])["choices"][0]["prompt_logprobs"] == expected
        body = _json_response({"id": "x", "prompt_logprobs": raw}).body
        assert json.loads(body) == {"id": "x", "prompt_logprobs": expected}
    assert asyncio.run(routes._prompt_logprobs(None, [1, 2], None)) is None


def test_openai_answer_logprobs_keep_their_shapes_long_or_short():
    """Completions' {tokens, token_logprobs, top_logprobs, text_offset} and chat's content list, whether a
    streamed chunk's few tokens (lists) or a whole long answer's (written off the loop)."""
    routes = _routes()
    for length in (2, 300):
        ids = list(range(50, 50 + length))
        lps = [{"logprob": -0.25 * i, "top": [[ids[i], -0.25 * i], [3, -4.0]]} for i in range(length)]
        completion = json.loads(_sse(asyncio.run(routes._completion_logprobs(None, ids, lps)))[len("data: "):])
        assert completion == {"tokens": [f"<{t}>" for t in ids], "token_logprobs": [-0.25 * i for i in range(length)],
                              "top_logprobs": [{f"<{ids[i]}>": -0.25 * i, "<3>": -4.0} for i in range(length)],
                              "text_offset": []}

        def item(t: int, lp: float) -> dict:
            return {"token": f"<{t}>", "logprob": lp, "bytes": list(f"<{t}>".encode())}

        chat = json.loads(_json_response({"content": asyncio.run(routes._chat_logprobs(None, ids, lps))}).body)
        assert chat == {"content": [{**item(ids[i], -0.25 * i),
                                     "top_logprobs": [item(ids[i], -0.25 * i), item(3, -4.0)]} for i in range(length)]}


def _routes():
    from cluster.openai_http import OpenAIRoutes

    class Frontend:
        @staticmethod
        def token_text(route, token_id: int) -> str:
            return f"<{token_id}>"

        @staticmethod
        def token_bytes(route, token_id: int) -> bytes:
            return f"<{token_id}>".encode()

    routes = OpenAIRoutes()
    routes.frontend = Frontend()
    return routes
