"""Work on a request's input that could stall the ingress's event loop goes to a worker thread when large.

One ingress replica streams every request's tokens from one event loop, so anything a request costs on that
loop is a pause in everyone else's stream. Tokenizing a 1 MB prompt, rendering a chat with a hundred tools,
checking their JSON schemas or compiling a large structured-output schema takes from tens of milliseconds to
seconds. Such work runs in a thread when its input is large; shorter input costs less than the hop to a
thread, and stays inline. (Tokenizers and llguidance release the GIL; jsonschema does not, but in a thread
the loop still gets its turns every few milliseconds instead of none until the work ends.)
"""
from __future__ import annotations

import asyncio

# Input sizes (characters) above which the work goes to a thread.
OFF_LOOP_CHARS = 4096


async def off_loop(size: int, fn, *args, **kwargs):
    """fn(*args, **kwargs), in a worker thread when `size` (characters of input) is large."""
    if size > OFF_LOOP_CHARS:
        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)
