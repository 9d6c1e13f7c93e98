"""`herd`: the command line for operators and developers.

Subcommands come from the modules that own them (each exposes a `register_*` function), so this file only
assembles the parser: generate / chat / demo-checkpoint (engine), serve / client (the cluster), plan
(parallel layouts), bench (benchmarks), k8s (Kubernetes). It is the one face over the whole product: the only
serving module that imports benchmark code (.importlinter). Building the parser imports neither torch nor Ray:
the commands that need a model import the engine when they run.
"""
from __future__ import annotations

import argparse
import logging
import sys

from cluster.client import add_sampling_args, sampling_from_args
from cluster.logs import log_through_root
from cluster.settings_flags import add_setting_flags, set_flags, setting_fields
from workers.engine_config import EngineConfig
from workers.errors import HerdError

# Every engine setting is a flag of `herd generate` / `herd chat` (names, types, help from EngineConfig's fields).
ENGINE_FLAGS = setting_fields(EngineConfig)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face Llama checkpoint folder")
    p.add_argument("--dtype", default=None, help="auto (default), bfloat16, float16, float32")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "--pp", type=int, default=1)
    add_setting_flags(p.add_argument_group("engine settings"), ENGINE_FLAGS)


def _sampling_from_args(args):
    from workers import SamplingParams
    return SamplingParams(**sampling_from_args(args))


def _load_engine(args, async_engine: bool = False):
    from workers import AsyncEngine, Engine
    cls = AsyncEngine if async_engine else Engine
    extra = set_flags(args, ENGINE_FLAGS)
    print(f"loading {args.model} ...", file=sys.stderr)
    return cls.from_pretrained(args.model, tensor_parallel_size=args.tensor_parallel_size,
                               pipeline_parallel_size=args.pipeline_parallel_size, dtype=args.dtype, **extra)


def cmd_generate(args) -> int:
    params = _sampling_from_args(args)
    engine = _load_engine(args)
    try:
        for prompt in args.prompt:
            out = engine.generate([prompt], params)[0]
            print(out.text if engine.tokenizer else out.token_ids)
            print(f"[finish_reason={out.finish_reason} tokens={len(out.token_ids)}]", file=sys.stderr)
    finally:
        engine.shutdown()
    return 0


def cmd_chat(args) -> int:
    from workers import InvalidRequestError
    params = _sampling_from_args(args)
    engine = _load_engine(args)
    if engine.tokenizer is None:
        print("this checkpoint has no tokenizer; chat needs one", file=sys.stderr)
        return 2
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends the session", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            if not line:
                break
            messages.append({"role": "user", "content": line})
            try:
                prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                rid = engine.add_request(prompt_ids, params)
            except InvalidRequestError as e:
                print(f"error: {e}", file=sys.stderr)
                messages.pop()
                continue
            print("assistant> ", end="", flush=True)
            reply = []
            while engine.has_unfinished():
                for d in engine.step():
                    if d.request_id == rid:
                        reply.append(d.text)
                        print(d.text, end="", flush=True)
            print()
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        engine.shutdown()
    return 0


def cmd_demo_checkpoint(args) -> int:
    from workers.demo import write_demo_checkpoint
    path = write_demo_checkpoint(args.outdir, args.shape, seed=args.seed)
    print(f"wrote {args.shape} demo checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from workers.demo import DEMO_SHAPES
    parser = argparse.ArgumentParser(prog="herd", description="Serve Llama models on a Ray cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate from a checkpoint in this process")
    _add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    add_sampling_args(p, max_tokens=128, temperature=0.0)  # greedy unless asked
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a checkpoint in this process (streams tokens)")
    _add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_tokens=128, temperature=0.0)  # greedy unless asked
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("demo-checkpoint", help="write a small random-weight checkpoint in the HF layout")
    p.add_argument("outdir")
    p.add_argument("--shape", choices=list(DEMO_SHAPES), default="llama32-1b-mini")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_checkpoint)

    from cluster import serve_cli
    serve_cli.register_cli(sub)          # herd serve, herd client ...
    from cluster import status
    status.register_cli(sub)             # herd status
    from cluster.plan_cli import register_plan_cli
    register_plan_cli(sub)               # herd plan
    from cluster import k8s
    k8s.register_cli(sub)                # herd k8s render | apply | status | delete

    bench = sub.add_parser("bench", help="benchmarks (print JSON figures)")
    bench_sub = bench.add_subparsers(dest="scenario", required=True)
    from benchmarks import (engine_bench, load_bench, parallel_bench, routing_sim, sampler_bench, serve_bench,
                            soak_bench)
    engine_bench.register_bench(bench_sub)
    sampler_bench.register_bench(bench_sub)  # herd bench sampler
    parallel_bench.register_bench(bench_sub)
    serve_bench.register_bench(bench_sub)
    routing_sim.register_bench(bench_sub)
    load_bench.register_bench(bench_sub)  # herd bench load
    soak_bench.register_bench(bench_sub)  # herd bench soak, herd bench fault
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_through_root()                   # herd.* records: this handler, not Ray's (cluster/logs.py)
    try:
        if args.command == "bench":       # stdout carries the one JSON report; Ray's and other output to stderr
            from benchmarks.bench_common import stdout_reserved_for_report
            with stdout_reserved_for_report():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except HerdError as e:
        print(f"herd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:   # a file or folder the command cannot read or write: its errno and path say it all
        logging.getLogger("herd.cli").debug("the command failed", exc_info=True)   # -v: where
        print(f"herd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
