"""Peak RSS of one model served under several names, against one name and against two loads.

    .venv/bin/python bench/served_names.py

Three servers on the built-in model, each after the same embedding work through every name:

- ``one name``: ``--model all-minilm-l6-v2``;
- ``3 names``: ``--model text-embedding-3-small=all-minilm-l6-v2`` plus two ``--model-alias``
  (one loaded model, as the flags promise);
- ``2 loads``: the same files as two sources (a copy of the directory), which is what serving a
  second name cost before aliases: two sets of sessions and queues.

Prints each server's VmHWM and the ratio to ``one name``: aliases should stay at ~1.0x.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import sentences, start_server
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc
from embedding_server.models.loader import builtin_files

TEXTS = sentences(64, seed=3)


def builtin_copy(directory: Path) -> Path:
    """The built-in model as a plain model directory (its configs and the built fp32 graph)."""
    files = builtin_files()
    shutil.copytree(
        files.root, directory, ignore=shutil.ignore_patterns("*.py", "__pycache__", "*.safetensors")
    )
    shutil.copyfile(files.onnx, directory / "model.onnx")
    return directory


def peak_after_work(args: list[str], names: list[str]) -> float:
    server = start_server(*args, "--sessions", "1", rest=False)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            for name in names:
                for start in range(0, len(TEXTS), 16):
                    stub.Embed(pb.EmbedRequest(inputs=TEXTS[start : start + 16], model=name), timeout=120)
        return server.peak_rss_mb()
    finally:
        server.stop()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        first = builtin_copy(Path(tmp) / "a")
        second = builtin_copy(Path(tmp) / "b")
        runs = {
            "one name": (["--model", "all-minilm-l6-v2"], ["all-minilm-l6-v2"]),
            "3 names": (
                [
                    "--model",
                    "text-embedding-3-small=all-minilm-l6-v2",
                    "--model-alias",
                    "all-minilm-l6-v2=text-embedding-3-small",
                    "--model-alias",
                    "minilm=text-embedding-3-small",
                ],
                ["text-embedding-3-small", "all-minilm-l6-v2", "minilm"],
            ),
            "2 loads": (["--model", f"a={first}", "--model", f"b={second}"], ["a", "b"]),
        }
        peaks = {label: peak_after_work(args, names) for label, (args, names) in runs.items()}
    base = peaks["one name"]
    print(f"{'server':<10} {'peak RSS (VmHWM)':>17} {'vs one name':>12}")
    for label, peak in peaks.items():
        print(f"{label:<10} {peak:>13.0f} MiB {peak / base:>11.2f}x")


if __name__ == "__main__":
    main()
