"""Regenerate the Python gRPC stubs from proto/herd/v1/inference.proto (`make proto`).

    python -m proto.build [--out DIR]      # run from the repository root

The stubs land in `cluster/pb/` (inference_pb2.py, inference_pb2.pyi, inference_pb2_grpc.py), not beside the
.proto: the top-level Python name `proto` is also taken by the `proto-plus` distribution (pulled in by
ray[serve] -> opencensus -> google-api-core), so `import proto.herd...` resolves to a different package
depending on sys.path order. `cluster.pb` always imports.

protoc is run with `-I proto`, so the descriptor's file name is the canonical `herd/v1/inference.proto`
(what reflection shows and what other languages import). Two generated lines assume the Python module is
`herd.v1.inference_pb2` and are rewritten: the gRPC module's import of it becomes relative, and the message
classes' module name becomes `__name__` (`cluster.pb.inference_pb2`), which pickling needs. Output is deterministic for a pinned grpcio-tools,
which tests/test_proto.py relies on to check that the committed stubs are fresh.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTO_FILE = "herd/v1/inference.proto"
DEFAULT_OUT = REPO_ROOT / "cluster" / "pb"
GENERATED = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Write the generated stubs into `out_dir` (created if needed); return their paths."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rc = protoc.main([
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc}")
        generated_dir = Path(tmp) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED:
            text = (generated_dir / name).read_text()
            text = text.replace("from herd.v1 import inference_pb2", "from . import inference_pb2")
            # Message classes take __module__ from this argument; pickling (Serve passes requests between
            # processes) imports that module, so it must be where the file really lives.
            text = text.replace("(DESCRIPTOR, 'herd.v1.inference_pb2', _globals)", "(DESCRIPTOR, __name__, _globals)")
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
