"""Tool calling at the edge, shared by the gRPC Chat RPC and OpenAI's /v1/chat/completions.

One `ChatTools` per chat request says what its `tools` / `tool_choice` mean for the three stages of the
request (the engine-side pieces are workers.tool_calls):
- the prompt: which tools the chat template renders (none for `tool_choice: "none"`);
- the sampling: for "required" or a named function, a JSON-schema constraint (workers.structured_output)
  that forces one well-formed call, so the answer always parses;
- the output: `parse` turns a completion's chunk stream into content plus, on its last chunk, `tool_calls`
  with finish_reason "tool_calls". Text that may be a call is held back until the completion ends, so a
  client never sees a half call as content; text that cannot be one streams as it comes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, AsyncIterator

from cluster.errors import ApiError, to_api_error
from cluster.limits import InputLimits
from cluster.off_loop import off_loop


@dataclass
class ChatTools:
    tools: list[dict] | None      # validated OpenAI tools the template renders (None: no tools in play)
    choice: str | dict            # validated tool_choice: "auto" | "none" | "required" | {"function": {name}}
    chars: int = 0                # the request's tools as JSON: rendering them costs time in proportion

    @classmethod
    def from_request(cls, tools: Any, tool_choice: Any, chars: int = 0) -> "ChatTools":
        from workers.errors import InvalidRequestError
        from workers.tool_calls import validate_tool_choice, validate_tools

        try:
            valid = validate_tools(tools) if tools else []
            choice = validate_tool_choice(tool_choice, valid)
        except InvalidRequestError as e:
            raise to_api_error(e) from None
        return cls(valid if valid and choice != "none" else None, choice, chars)

    @classmethod
    async def checked(cls, tools: Any, tool_choice: Any, limits: InputLimits) -> "ChatTools":
        """`from_request` at the edge: the tools' size bounded first (limits.max_tools_chars), and large ones
        checked off the event loop (jsonschema checks a tool's schema in ~3 ms, holding the GIL)."""
        from workers.structured_output import json_chars

        chars = json_chars(tools)
        limits.check_tools_chars(chars)
        return await off_loop(chars, cls.from_request, tools, tool_choice, chars)

    @classmethod
    def none(cls) -> "ChatTools":
        """No tools in play (a plain completion)."""
        return cls(None, "none")

    @property
    def active(self) -> bool:
        return self.tools is not None

    def constrain(self, sampling: dict[str, Any]) -> dict[str, Any]:
        """`sampling` with the constraint a forced call needs (unchanged for "auto" / "none")."""
        from workers.tool_calls import tool_call_json_schema

        if not self.active:
            return sampling
        schema = tool_call_json_schema(self.tools, self.choice)
        if schema is None:
            return sampling
        if sampling.get("structured") is not None:
            raise ApiError.invalid("tool_choice", "a forced tool call cannot be combined with a structured "
                                                  "output format (response_format); use one of them")
        return {**sampling, "structured": {"json_schema": schema}}

    async def parse(self, stream: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """Chunks of `stream` (any number of completions, told apart by "index") with their text reduced to
        content and, on each completion's last chunk, "tool_calls" (OpenAI-shaped) when it called tools."""
        if not self.active:
            async for chunk in stream:
                yield chunk
            return
        from workers.tool_calls import ToolCallStreamParser

        parsers: dict[int, ToolCallStreamParser] = {}
        async for chunk in stream:
            index = chunk.get("index", 0)
            parser = parsers.setdefault(index, ToolCallStreamParser(self.tools))
            text = parser.feed(chunk["text"])
            chunk = {**chunk, "text": text}
            if chunk["finish_reason"] is not None:
                parsed = parser.finish()
                if parsed.tool_calls:
                    chunk["tool_calls"] = [call.to_openai() for call in parsed.tool_calls]
                    if chunk["finish_reason"] == "stop":
                        chunk["finish_reason"] = "tool_calls"
                else:
                    chunk["text"] += parsed.content or ""
            yield chunk
