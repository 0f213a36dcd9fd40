"""Generate the Python code for the gRPC contract into embedding_client.proto.

Run after editing ``protos/embedding/v1/embedding.proto``::

    python protos/generate.py            # rewrite the generated files
    python protos/generate.py --check    # exit 1 if they are stale

The generated modules live in the client package because both the client and
the server speak the same wire contract; the server depends on the client.
protoc writes absolute imports (``from embedding.v1 import ...``); they are
rewritten to the package path so no top-level ``embedding`` package exists.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO = "embedding/v1/embedding.proto"
TARGET = ROOT / "client" / "embedding_client" / "proto"
GENERATED = ("embedding_pb2.py", "embedding_pb2.pyi", "embedding_pb2_grpc.py")
PACKAGE = "embedding_client.proto"
WELL_KNOWN_TYPES = Path(grpc_tools.__file__).parent / "_proto"


def generate(out_dir: Path) -> None:
    """Run protoc on the contract and write the three modules into out_dir."""
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{WELL_KNOWN_TYPES}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            str(PROTO_ROOT / PROTO),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for name in GENERATED:
            text = (Path(raw) / "embedding" / "v1" / name).read_text()
            text = text.replace("from embedding.v1 import", f"from {PACKAGE} import")
            (out_dir / name).write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if stale")
    args = parser.parse_args()
    if not args.check:
        generate(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        stale = [n for n in GENERATED if not filecmp.cmp(Path(fresh) / n, TARGET / n, shallow=False)]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run python protos/generate.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
