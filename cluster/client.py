"""A small gRPC client for herd's API, and `herd client ...` for operators.

    herd client models
    herd client generate --model llama-1b --prompt "Once upon a time" --max-tokens 32
    herd client chat --model llama-8b --message "Hi!"          # one turn; without --message: interactive
    herd client tokenize --model llama-1b "Hello world"
    herd client health [--service llama-1b]

Options for every command: --address HOST:PORT (default $HERD_ADDRESS or 127.0.0.1:9000), --api-key KEY
(default $HERD_API_KEY; sent as `authorization: Bearer KEY`), --timeout SECONDS (the call's deadline),
--tls (TLS, trusting the system's roots) or --tls-ca FILE (TLS, trusting FILE's PEM certificates, e.g. a
self-signed server's own; default $HERD_TLS_CA).
Text streams to stdout as it arrives; finish reason and token usage go to stderr. A failed call prints its
gRPC status code and message and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterator

import grpc

from cluster.pb import inference_pb2 as pb
from cluster.pb import inference_pb2_grpc as pb_grpc
from cluster.settings_flags import SettingField, add_setting_flags, dataclass_setting_fields

DEFAULT_ADDRESS = "127.0.0.1:9000"
# The proto's sampling fields (tests/test_proto.py holds them equal to workers.SamplingParams').
SAMPLING_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


def structured_message(spec: dict[str, Any]) -> pb.StructuredOutput:
    """pb.StructuredOutput from workers.StructuredOutputs' dict form, e.g. {"json_schema": {...}} or
    {"choice": ["yes", "no"]} (a schema may be a dict or its JSON text)."""
    if len(spec) != 1:
        raise TypeError(f"structured takes exactly one of json_schema, json_object, regex, choice, grammar; got {spec}")
    [(kind, value)] = spec.items()
    if kind == "choice":
        return pb.StructuredOutput(choice=pb.Choices(choices=list(value)))
    if kind == "json_schema" and not isinstance(value, str):
        value = json.dumps(value)
    return pb.StructuredOutput(**{kind: value})


def sampling_message(**kw) -> pb.SamplingParams:
    """pb.SamplingParams from keyword arguments; None values stay unset (server defaults). `structured` takes
    the dict form (see structured_message), `logit_bias` a {token_id: bias} dict."""
    unknown = set(kw) - set(SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    kw = {k: v for k, v in kw.items() if v is not None}
    if "structured" in kw and isinstance(kw["structured"], dict):
        kw["structured"] = structured_message(kw["structured"])
    return pb.SamplingParams(**kw)


def chat_message(m: dict[str, Any]) -> pb.ChatMessage:
    """pb.ChatMessage from an OpenAI-shaped message dict (role, content, tool_calls, tool_call_id, name)."""
    calls = [pb.ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"]["arguments"])
             for c in m.get("tool_calls") or ()]
    return pb.ChatMessage(role=m["role"], content=m.get("content") or "", tool_calls=calls,
                          tool_call_id=m.get("tool_call_id", ""), name=m.get("name", ""))


def tool_message(tool: dict[str, Any]) -> pb.Tool:
    """pb.Tool from an OpenAI tool definition ({"type": "function", "function": {name, description, parameters}})."""
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    return pb.Tool(name=fn["name"], description=fn.get("description", ""),
                   parameters=json.dumps(params) if params is not None else "")


def tool_choice_message(choice: str | dict[str, Any]) -> pb.ToolChoice:
    if isinstance(choice, str):
        return pb.ToolChoice(mode=choice)
    return pb.ToolChoice(function=choice["function"]["name"])


class HerdClient:
    """Thin wrapper over the generated stub: metadata for the API key, deadlines, typed requests."""

    def __init__(self, address: str = DEFAULT_ADDRESS, api_key: str | None = None,
                 channel: grpc.Channel | None = None, *, tls: bool = False, tls_ca_file: str | None = None):
        """tls / tls_ca_file: a TLS channel trusting the system's roots / the PEM certificates in tls_ca_file."""
        if channel is None and (tls or tls_ca_file):
            from cluster.grpc_tls import channel_credentials

            channel = grpc.secure_channel(address, channel_credentials(tls_ca_file))
        self.channel = channel or grpc.insecure_channel(address)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else []

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "HerdClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, model: str, prompt: str | list[int], *, timeout: float | None = None,
                 request_id: str = "", **sampling) -> Iterator[pb.GenerateResponse]:
        req = pb.GenerateRequest(model=model, sampling=sampling_message(**sampling), request_id=request_id)
        if isinstance(prompt, str):
            req.text = prompt
        else:
            req.token_ids.ids.extend(prompt)
        return self.stub.Generate(req, timeout=timeout, metadata=self.metadata)

    def chat(self, model: str, messages: list[dict[str, Any]], *, timeout: float | None = None,
             request_id: str = "", tools: list[dict[str, Any]] | None = None,
             tool_choice: str | dict[str, Any] | None = None, **sampling) -> Iterator[pb.GenerateResponse]:
        """Messages, tools and tool_choice in OpenAI's shapes."""
        req = pb.ChatRequest(model=model, messages=[chat_message(m) for m in messages],
                             sampling=sampling_message(**sampling), request_id=request_id,
                             tools=[tool_message(t) for t in tools or ()])
        if tool_choice is not None:
            req.tool_choice.CopyFrom(tool_choice_message(tool_choice))
        return self.stub.Chat(req, timeout=timeout, metadata=self.metadata)

    def tokenize(self, model: str, text: str = "", *, messages: list[dict[str, Any]] | None = None,
                 tools: list[dict[str, Any]] | None = None, add_bos: bool | None = None,
                 timeout: float | None = None) -> pb.TokenizeResponse:
        req = pb.TokenizeRequest(model=model, text=text, messages=[chat_message(m) for m in messages or []],
                                 tools=[tool_message(t) for t in tools or ()])
        if add_bos is not None:
            req.add_bos = add_bos
        return self.stub.Tokenize(req, timeout=timeout, metadata=self.metadata)

    def list_models(self, *, timeout: float | None = None) -> pb.ListModelsResponse:
        return self.stub.ListModels(pb.ListModelsRequest(), timeout=timeout, metadata=self.metadata)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        resp = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def collect(stream: Iterator[pb.GenerateResponse]) -> tuple[list[int], str, pb.GenerateResponse]:
    """Drain a Generate/Chat stream: (all token ids, all text, the last response with finish_reason/usage)."""
    ids, text, last = [], [], None
    for resp in stream:
        ids += resp.token_ids
        text.append(resp.text)
        last = resp
    return ids, "".join(text), last


# ---- herd client ... -----------------------------------------------------------------------------------
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("HERD_ADDRESS", DEFAULT_ADDRESS),
                   help="gRPC address HOST:PORT (default $HERD_ADDRESS or %(default)s)")
    p.add_argument("--api-key", default=os.environ.get("HERD_API_KEY"), help="API key (default $HERD_API_KEY)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    p.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's root certificates")
    p.add_argument("--tls-ca", default=os.environ.get("HERD_TLS_CA") or None, metavar="FILE",
                   help="connect over TLS, trusting the PEM certificates in FILE (default $HERD_TLS_CA)")


def sampling_flag_fields() -> list[SettingField]:
    """workers.SamplingParams' fields that the command line takes (names, types, defaults and help from the
    dataclass; the light module, so no engine is imported)."""
    from dataclasses import fields

    from workers.sampling_params import SamplingParams

    names = [f.name for f in fields(SamplingParams) if f.metadata.get("cli", True)]
    return dataclass_setting_fields(SamplingParams, names)


def add_sampling_args(p: argparse.ArgumentParser, **defaults) -> None:
    """Sampling flags (shared by `herd client` and the in-process `herd generate`/`chat`), one per
    SamplingParams field. Unset flags stay None, meaning the engine's default (shown in the help), unless
    `defaults` names another default."""
    flags = [f._replace(default=defaults.get(f.name, f.default)) for f in sampling_flag_fields()]
    add_setting_flags(p.add_argument_group("sampling"), flags)
    p.set_defaults(**defaults)


def sampling_from_args(args) -> dict:
    return {name: getattr(args, name, None) for name in SAMPLING_FIELDS if getattr(args, name, None) is not None}


def _client(args) -> HerdClient:
    return HerdClient(args.address, api_key=args.api_key, tls=args.tls, tls_ca_file=args.tls_ca)


def _stream_out(stream, show_ids: bool) -> int:
    last = None
    for resp in stream:
        if show_ids:
            print(" ".join(map(str, resp.token_ids)), end=" " if resp.token_ids else "", flush=True)
        else:
            print(resp.text, end="", flush=True)
        last = resp
    print()
    if last is not None:
        u = last.usage
        print(f"[finish_reason={last.finish_reason} prompt_tokens={u.prompt_tokens} "
              f"completion_tokens={u.completion_tokens} cached_tokens={u.cached_tokens}]", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    with _client(args) as c:
        for m in c.list_models(timeout=args.timeout).models:
            cols = [m.name, f"max_model_len={m.max_model_len}", f"vocab={m.vocab_size}",
                    f"TP{m.tensor_parallel_size}xPP{m.pipeline_parallel_size}"]
            print("\t".join(cols + (["autoscaled"] if m.autoscaling else [])))
    return 0


def cmd_generate(args) -> int:
    prompt: str | list[int]
    if args.token_ids:
        prompt = [int(t) for t in args.token_ids.replace(",", " ").split()]
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = sys.stdin.read()
    with _client(args) as c:
        return _stream_out(c.generate(args.model, prompt, timeout=args.timeout, **sampling_from_args(args)),
                           show_ids=args.show_ids)


def cmd_chat(args) -> int:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    with _client(args) as c:
        if args.message:
            messages += [{"role": "user", "content": m} for m in args.message]
            return _stream_out(c.chat(args.model, messages, timeout=args.timeout, **sampling_from_args(args)),
                               show_ids=False)
        print("chat with the model; an empty line or Ctrl-D ends the session", file=sys.stderr)
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                return 0
            if not line:
                return 0
            messages.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            reply = []
            for resp in c.chat(args.model, messages, timeout=args.timeout, **sampling_from_args(args)):
                print(resp.text, end="", flush=True)
                reply.append(resp.text)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_tokenize(args) -> int:
    with _client(args) as c:
        resp = c.tokenize(args.model, args.text, timeout=args.timeout)
    print(" ".join(map(str, resp.token_ids)))
    print(f"[{len(resp.token_ids)} tokens; max_model_len={resp.max_model_len}]", file=sys.stderr)
    return 0


def cmd_health(args) -> int:
    with _client(args) as c:
        status = c.health(args.service, timeout=args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


def _guarded(func):
    def run(args) -> int:
        try:
            return func(args)
        except grpc.RpcError as e:
            print(f"herd client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return run


def register_client(subparsers) -> None:
    client = subparsers.add_parser("client", help="call a running herd cluster over gRPC")
    sub = client.add_subparsers(dest="client_command", required=True)

    p = sub.add_parser("models", help="list the served models")
    _add_common(p)
    p.set_defaults(func=_guarded(cmd_models))

    p = sub.add_parser("generate", help="complete a prompt (streams the text)")
    _add_common(p)
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    p.add_argument("--token-ids", default=None, help="prompt as token ids, e.g. '1,450,4996'")
    p.add_argument("--show-ids", action="store_true", help="print token ids instead of text")
    add_sampling_args(p)
    p.set_defaults(func=_guarded(cmd_generate))

    p = sub.add_parser("chat", help="chat with a model (interactive unless --message is given)")
    _add_common(p)
    p.add_argument("--model", required=True)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--message", action="append", default=None, help="user message (repeatable): one turn")
    add_sampling_args(p)
    p.set_defaults(func=_guarded(cmd_chat))

    p = sub.add_parser("tokenize", help="token ids of a text with the model's tokenizer")
    _add_common(p)
    p.add_argument("--model", required=True)
    p.add_argument("text")
    p.set_defaults(func=_guarded(cmd_tokenize))

    p = sub.add_parser("health", help="grpc.health.v1 status (exit 0 when SERVING)")
    _add_common(p)
    p.add_argument("--service", default="", help="a model name, or empty for the whole cluster")
    p.set_defaults(func=_guarded(cmd_health))
