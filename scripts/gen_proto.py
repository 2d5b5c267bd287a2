"""Regenerate the Python protobuf/gRPC modules in node/wire/ from proto/edgeshard/v1/edgeshard.proto.

    python scripts/gen_proto.py            # rewrite node/wire/edgeshard_pb2{,_grpc}.py{,i}
    python scripts/gen_proto.py --out DIR  # write them into DIR instead (the currency test does this)

The proto lives at proto/edgeshard/v1/ (its package is `edgeshard.v1`) but the generated modules must import
as `edgeshard.node.wire.edgeshard_pb2`. Rather than rewriting import lines afterwards, protoc is given a
virtual include path: `-Iedgeshard/node/wire=proto/edgeshard/v1` makes the file known to protoc as
`edgeshard/node/wire/edgeshard.proto`, so `--grpc_python_out` emits `from edgeshard.node.wire import
edgeshard_pb2`. Output goes to a temporary directory first and is copied from there, so a failed run never
leaves half-written modules behind. The generated files are committed and never edited by hand.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("proto/edgeshard/v1/edgeshard.proto")
VIRTUAL_DIR = "edgeshard/node/wire"
GENERATED = ("edgeshard_pb2.py", "edgeshard_pb2.pyi", "edgeshard_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and write the generated modules into `out_dir`; returns their paths."""
    import grpc_tools
    from grpc_tools import protoc  # a test dependency: only needed to regenerate

    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        argv = [
            "protoc",
            f"-I{VIRTUAL_DIR}={PROTO.parent.as_posix()}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{VIRTUAL_DIR}/{PROTO.name}",
        ]
        # protoc resolves -I paths against the working directory: run from the repository root.
        cwd = Path.cwd()
        try:
            os.chdir(ROOT)
            rc = protoc.main(argv)
        finally:
            os.chdir(cwd)
        if rc != 0:
            raise SystemExit(f"protoc failed (exit {rc}) on {PROTO}")
        written = []
        for name in GENERATED:
            src = Path(tmp) / VIRTUAL_DIR / name
            dst = out_dir / name
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "node" / "wire", help="where to write the modules")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
