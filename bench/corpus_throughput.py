"""Corpus throughput through the client (StreamEmbed) against the in-process ceiling, in one run.

    python bench/corpus_throughput.py                 # 4000 mixed 5-60 word texts, 3 rounds
    python bench/corpus_throughput.py --texts 20000 --rounds 5 --server-args "--sessions 2"

Three numbers, measured in alternating rounds on the same texts (medians):

- ceiling: no server, no network. The same ONNX file and tokenizer
  (embedding_server.models.loader's built-in model), the whole corpus
  tokenized, sorted by length and cut into batches within the server's
  default limits (128 sequences, 16384 padded tokens), each run on the
  session and pooled. Global length sorting pads less than any server can,
  which only sees the requests in flight: this is an upper bound.
- client: ``EmbeddingClient.embed_stream_batches`` over a real
  ``embedding-server`` process (StreamEmbed, 64 texts per request, 32 in
  flight), dense float32 arrays in input order handed to the caller;
  requests of consecutive texts, then (client+sort) with ``length_sort=4096``
  (requests of similar-length texts, results still in input order).
- cli: ``embedding-client corpus`` from a JSON Lines file into ``.npy``, as
  reported by the command (reading, counting and writing included; it sorts
  by length by default).

Client and server share the machine's cores, as the in-process run has them
all to itself: the ratios are a lower bound for a client on another machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sentences, start_server
from embedding_client import EmbeddingClient

MAX_BATCH_SIZE = 128
MAX_BATCH_TOKENS = 16384


def load_builtin(threads: int):
    from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, load

    return load(ModelSpec(BUILTIN_MODEL, None), sessions=1, threads=threads)


def length_sorted_batches(lengths: list[int]) -> list[list[int]]:
    """Indices by length, cut where the batch would pass the server's size or token limit."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) >= MAX_BATCH_SIZE or lengths[i] * (len(batch) + 1) > MAX_BATCH_TOKENS):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def embed_in_process(loaded, texts: list[str]) -> np.ndarray:
    """Tokenize, sort, batch, run, pool, normalize: everything the server does but the wire."""
    from embedding_server.engine.work import WorkItem, pad
    from embedding_server.models.base import RowRequest
    from embedding_server.models.types import Output

    model = loaded.model
    encoded = model.tokenize(texts, 0, True)
    out = np.empty((len(texts), model.description.dimensions), np.float32)
    for chunk in length_sorted_batches([len(e) for e in encoded]):
        rows = [RowRequest(len(encoded[i]), frozenset({Output.DENSE})) for i in chunk]
        items = [WorkItem(encoded[i], row, 0, 0, None, None) for i, row in zip(chunk, rows, strict=True)]  # type: ignore[arg-type]
        padded = pad(items, model.tokenizer.pad_id)
        feeds = model.feeds(padded.input_ids, padded.attention_mask, 0)
        outputs = loaded.sessions.run(0, model.output_names, feeds)
        vectors = model.postprocess(outputs, padded.input_ids, padded.attention_mask, rows)
        dense = np.concatenate([v.dense for v in vectors])  # type: ignore[misc]
        out[chunk] = dense / np.linalg.norm(dense, axis=1, keepdims=True)
    return out


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def client_run(target: str, texts: list[str], batch_size: int, window: int, sort: int | None) -> np.ndarray:
    with EmbeddingClient(target) as client:
        run = client.embed_stream_batches(texts, batch_size=batch_size, window=window, length_sort=sort)
        return np.concatenate([batch.dense for batch in run])  # type: ignore[misc]


def cli_run(target: str, corpus: Path, output: Path) -> float:
    """items/s as ``embedding-client corpus`` reports it."""
    output.unlink(missing_ok=True)
    command = [sys.executable, "-m", "embedding_client.cli", "corpus", str(corpus), str(output)]
    command += ["--target", target, "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(re.search(r"\((\d+) items/s\)", done.stderr).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="texts per StreamEmbed request")
    parser.add_argument("--window", type=int, default=32, help="requests in flight")
    parser.add_argument("--server-args", default="", help="extra embedding-server flags")
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    texts = sentences(args.texts, 5, 60, seed=7)
    workdir = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))

    loaded = load_builtin(threads)
    embed_in_process(loaded, texts[:256])  # warm-up
    server = start_server(*shlex.split(args.server_args), rest=False)
    try:
        client_run(server.target, texts[:256], args.batch_size, args.window, None)  # warm-up
        ceiling, client, client_sorted, cli = [], [], [], []
        reference = None
        target, size, window = server.target, args.batch_size, args.window
        for round_ in range(args.rounds):
            seconds, reference = timed(lambda: embed_in_process(loaded, texts))
            ceiling.append(len(texts) / seconds)
            seconds, streamed = timed(lambda: client_run(target, texts, size, window, None))
            client.append(len(texts) / seconds)
            seconds, by_length = timed(lambda: client_run(target, texts, size, window, 4096))
            client_sorted.append(len(texts) / seconds)
            cli.append(cli_run(server.target, corpus, workdir / "out.npy"))
            print(
                f"round {round_ + 1}: ceiling {ceiling[-1]:.0f}/s  client {client[-1]:.0f}/s  "
                f"client+sort {client_sorted[-1]:.0f}/s  cli {cli[-1]:.0f}/s",
                flush=True,
            )
        # Same vectors, or the comparison means nothing.
        np.testing.assert_allclose(streamed, reference, atol=1e-4)  # type: ignore[arg-type]
        np.testing.assert_allclose(by_length, reference, atol=1e-4)  # type: ignore[arg-type]
        np.testing.assert_allclose(np.load(workdir / "out.npy"), reference, atol=1e-4)  # type: ignore[arg-type]
    finally:
        server.stop()

    c, s, o, k = (statistics.median(v) for v in (ceiling, client, client_sorted, cli))
    print()
    print(f"corpus: {len(texts)} texts of 5-60 words, {threads} cores, model all-minilm-l6-v2")
    print(f"in-process ceiling                 {c:8.0f} texts/s")
    print(f"client embed_stream (gRPC)         {s:8.0f} texts/s   ratio {s / c:.2f}")
    print(f"client embed_stream, length_sort   {o:8.0f} texts/s   ratio {o / c:.2f}")
    print(f"embedding-client corpus .npy       {k:8.0f} texts/s   ratio {k / c:.2f}")


if __name__ == "__main__":
    main()
