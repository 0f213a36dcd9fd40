"""``embedding-client``: embed a corpus, take a quick look at a text, list the models.

    embedding-client corpus docs.jsonl vectors.npy --target ipv4:10.0.0.1:50051,10.0.0.2:50051
    embedding-client embed "some text" --target localhost:50051
    embedding-client models

Connection flags work on every command; ``--target`` and ``--api-key`` also
come from ``EMBEDDING_TARGET`` and ``EMBEDDING_API_KEY``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .channel import count_addresses
from .client import DEFAULT_TARGET, DEFAULT_WINDOW, EmbeddingClient
from .corpus import CorpusJob, run_corpus
from .corpus_formats import SUFFIXES
from .corpus_input import CorpusInputError
from .corpus_output import CorpusOutputError
from .enums import TASK_NAMES, output_name, parse_outputs, parse_task, task_name
from .envflags import apply_environment
from .errors import EmbeddingError
from .requests import DEFAULT_BATCH_SIZE
from .results import Embeddings

#: Streams for a target whose replicas a resolver finds (dns:///...): enough
#: for a few replicas; round_robin spreads the calls.
RESOLVER_STREAMS = 4
#: Look-ahead of the length sort, in records (10-15% more throughput on mixed 5-60
#: word texts, see bench/corpus_throughput.py); a few MiB of text at most.
DEFAULT_LENGTH_SORT = 4096


def _task(text: str) -> int:
    try:
        return int(parse_task(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help="gRPC target: HOST:PORT, ipv4:A:P,B:P (replicas), dns:///HOST:PORT "
        f"(default $EMBEDDING_TARGET or {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--api-key",
        help="bearer token (default $EMBEDDING_API_KEY)",
    )
    g.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --ca-cert)")
    g.add_argument("--ca-cert", help="PEM file of the CA that signed the server's certificate")
    g.add_argument("--client-cert", help="PEM client certificate chain (mTLS)")
    g.add_argument("--client-key", help="PEM client key (mTLS)")
    g.add_argument("--server-name", help="the name to verify in the server's certificate")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per unary call (default 60)")
    # the two variables the server's deployment already sets; the rest are flags only
    apply_environment(p, os.environ, "EMBEDDING_", only=("target", "api_key"))
    return p


def _embedding_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("embedding")
    g.add_argument("--model", default="", help="model name (default: the server's default model)")
    g.add_argument("--task", type=_task, default=0, help=f"task: {', '.join(TASK_NAMES)}")
    g.add_argument("--dimensions", type=int, default=0, help="Matryoshka size; 0: full (default)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding-client", description="Client for embedding-service (gRPC)."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    connection, embedding = _connection_flags(), _embedding_flags()

    corpus = commands.add_parser(
        "corpus",
        parents=[connection, embedding],
        help="embed a JSON Lines or Parquet corpus into .jsonl, .npy or .parquet (resumable)",
        description='Embed INPUT (JSON Lines of {"id": ..., "text": ...}, or .parquet with columns id '
        "and text) through StreamEmbed into "
        'OUTPUT: .jsonl ({"id": ..., "embedding": [...]} per line), .npy (float32 rows) or .parquet '
        "(columns id and embedding, a fixed-size float32 list), all in input order. "
        "Rows go to OUTPUT.partial as they come; rerun the same command after an "
        "interruption to go on where it stopped (the result is identical to an uninterrupted run). "
        "Broken streams are re-established, so a server restart or a dead replica only slows it down.",
    )
    corpus.add_argument("input", type=Path, help="JSON Lines (.jsonl) or Parquet (.parquet) input")
    corpus.add_argument("output", type=Path, help=f"output file ({', '.join(SUFFIXES)})")
    corpus.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cut over-long texts to the model's max tokens (default); --no-truncate fails on them",
    )
    corpus.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="texts per request")
    corpus.add_argument(
        "--window", type=_positive, default=DEFAULT_WINDOW, help="requests in flight per stream"
    )
    corpus.add_argument(
        "--streams",
        type=_positive,
        default=None,
        help="concurrent StreamEmbed calls (default: one per listed address, "
        f"{RESOLVER_STREAMS} for a dns:/// target)",
    )
    corpus.add_argument(
        "--length-sort",
        type=int,
        default=DEFAULT_LENGTH_SORT,
        metavar="N",
        help="read up to N records ahead and send requests of records alike in length, so the server "
        "pads less "
        f"(default {DEFAULT_LENGTH_SORT}; 0: in file order). The output is in input order either way",
    )
    corpus.add_argument(
        "--retry-timeout",
        type=float,
        default=300.0,
        help="give up after this many seconds of failures without a single reply (default 300)",
    )
    corpus.add_argument(
        "--late-chunking",
        action="store_true",
        help='each INPUT line is one document, {"id": ..., "chunks": ["...", ...]}: every chunk gets a '
        "vector pooled from token states that saw the whole document (documents longer than the "
        "model's window run as overlapping windows). OUTPUT .jsonl: one line per document, "
        '{"id": ..., "embeddings": [[...], ...]} with a vector per chunk; .npy: one float32 row per chunk, '
        "in input order; .parquet input: a chunks column (list of strings); .parquet output: columns id "
        "and embeddings (a list of vectors per document)",
    )
    corpus.add_argument("--no-progress", action="store_true", help="no progress bar")

    embed = commands.add_parser(
        "embed", parents=[connection, embedding], help="embed a few texts and show the vectors"
    )
    embed.add_argument("texts", nargs="+", help="texts to embed")
    embed.add_argument(
        "--output",
        dest="outputs",
        action="append",
        choices=["dense", "sparse", "colbert", "binary"],
        help="output kind, repeatable (default dense)",
    )
    embed.add_argument("--truncate", action="store_true", help="cut over-long texts to the max tokens")
    embed.add_argument(
        "--late-chunking",
        action="store_true",
        help="the texts are consecutive chunks of one document: one vector per chunk, with the whole "
        "document as context",
    )
    embed.add_argument("--json", action="store_true", help="full vectors as JSON Lines")

    models = commands.add_parser("models", parents=[connection], help="list the served models")
    models.add_argument("--json", action="store_true", help="as JSON")
    return parser


def make_client(args: argparse.Namespace) -> EmbeddingClient:
    from .retry import StreamRetry

    retry = StreamRetry(timeout=getattr(args, "retry_timeout", 120.0))
    return EmbeddingClient(
        args.target,
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=args.ca_cert,
        client_certificate=args.client_cert,
        client_key=args.client_key,
        server_name=args.server_name,
        timeout=args.timeout,
        stream_retry=retry,
    )


def cmd_corpus(client: EmbeddingClient, args: argparse.Namespace) -> int:
    if args.output.suffix not in SUFFIXES:
        print(f"embedding-client: {args.output}: use one of {', '.join(SUFFIXES)}", file=sys.stderr)
        return 2
    streams = args.streams or count_addresses(args.target) or RESOLVER_STREAMS
    job = CorpusJob(
        input=args.input,
        output=args.output,
        model=args.model,
        task=args.task,
        dimensions=args.dimensions,
        truncate=args.truncate,
        batch_size=args.batch_size,
        window=args.window,
        streams=streams,
        length_sort=max(0, args.length_sort),
        progress=not args.no_progress,
        late_chunking=args.late_chunking,
    )
    summary = run_corpus(client, job)
    if summary.embedded or summary.records:
        print(
            f"{args.output}: {summary.records} records ({summary.skipped} from before), "
            f"{summary.embedded} embedded in {summary.seconds:.1f}s ({summary.rate:.0f} items/s), "
            f"model {summary.model or '(default)'}, {summary.reconnects} stream(s) re-established",
            file=sys.stderr,
        )
    return 0


def cmd_embed(client: EmbeddingClient, args: argparse.Namespace) -> int:
    outputs = parse_outputs(args.outputs)
    result = client.embed(
        args.texts,
        model=args.model or None,
        task=args.task,
        dimensions=args.dimensions or None,
        outputs=outputs,
        truncate=args.truncate,
        late_chunking=args.late_chunking,
    )
    for index, text in enumerate(args.texts):
        if args.json:
            print(json.dumps(_as_json(result, index, text)))
        else:
            print(_describe(result, index, text))
    return 0


def _as_json(result: Embeddings, index: int, text: str) -> dict[str, object]:
    item = result[index]
    row: dict[str, object] = {"text": text, "model": result.model}
    if item.dense is not None:
        row["embedding"] = item.dense.tolist()
    if item.sparse is not None:
        row["sparse_embedding"] = {str(k): v for k, v in item.sparse.to_dict().items()}
    if item.colbert is not None:
        row["colbert_embedding"] = item.colbert.tolist()
    if item.binary is not None:
        row["binary_embedding"] = item.binary.tolist()
    return row


def _describe(result: Embeddings, index: int, text: str) -> str:
    item = result[index]
    shown = text if len(text) <= 60 else text[:57] + "..."
    lines = [f"{shown!r}  model={result.model}"]
    if item.dense is not None:
        head = ", ".join(f"{v:+.4f}" for v in item.dense[:6])
        lines.append(f"  dense   d={item.dense.shape[0]} norm={np.linalg.norm(item.dense):.4f} [{head}, ...]")
    if item.sparse is not None:
        top = sorted(item.sparse.to_dict().items(), key=lambda kv: -kv[1])[:6]
        lines.append(f"  sparse  {len(item.sparse.ids)} tokens, top {[(k, round(v, 4)) for k, v in top]}")
    if item.colbert is not None:
        lines.append(f"  colbert {item.colbert.shape[0]} x {item.colbert.shape[1]}")
    if item.binary is not None:
        lines.append(f"  binary  {item.binary.shape[0]} bytes {item.binary[:8].tobytes().hex()}...")
    return "\n".join(lines)


def cmd_models(client: EmbeddingClient, args: argparse.Namespace) -> int:
    models = client.list_models()
    if args.json:
        rows = [
            {
                "name": m.name,
                "family": m.family,
                "dimensions": m.dimensions,
                "max_tokens": m.max_tokens,
                "max_document_tokens": m.max_document_tokens,
                "tasks": [task_name(t) for t in m.tasks],
                "outputs": [output_name(o) for o in m.outputs],
                "matryoshka_dimensions": list(m.matryoshka_dimensions),
                "is_default": m.is_default,
                "engine": m.engine,
                "precision": m.precision,
            }
            for m in models
        ]
        print(json.dumps(rows, indent=2))
        return 0
    header = ("NAME", "FAMILY", "DIMS", "MAX TOKENS", "MAX DOCUMENT", "ENGINE", "OUTPUTS", "TASKS")
    table = [
        (
            m.name + (" (default)" if m.is_default else ""),
            m.family,
            str(m.dimensions),
            str(m.max_tokens),
            str(m.max_document_tokens or "-"),
            f"{m.engine} {m.precision}".strip() or "-",
            ",".join(output_name(o) for o in m.outputs),
            ",".join(task_name(t) for t in m.tasks) or "-",
        )
        for m in models
    ]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


COMMANDS = {"corpus": cmd_corpus, "embed": cmd_embed, "models": cmd_models}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: raised in the main thread, so a corpus run stops the same way for both."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """The SIGINT/SIGTERM handler: the first signal stops the run, the second waits for the save.

    The first raises Interrupted, and the corpus job closes its output and says
    how many records are saved (a fraction of a second). A second signal in
    that window would cut it short, leaving no "saved" line; it is noted
    instead. A third quits at once.
    """

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, signum: int, frame: object) -> None:
        self.seen += 1
        if self.seen == 1:
            raise Interrupted(signum)
        if self.seen == 2:
            print("embedding-client: saving what is done, then stopping (again: quit now)", file=sys.stderr)
            return
        os._exit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The exit status: 0, 1 (failed), 2 (usage); interrupted, 128 + the signal (130 SIGINT, 143 SIGTERM)."""
    args = build_parser().parse_args(argv)
    previous: dict[int, Any] = {}  # the handlers main() replaced
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        handler = StopOnSignal()
        for stop in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(stop) is not signal.SIG_IGN:  # a background job's ignored SIGINT stays so
                previous[stop] = signal.signal(stop, handler)
    try:
        with make_client(args) as client:
            return COMMANDS[args.command](client, args)
    except EmbeddingError as exc:
        print(f"embedding-client: {exc}", file=sys.stderr)
        return 1
    except (CorpusInputError, CorpusOutputError, OSError, ValueError) as exc:
        print(f"embedding-client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        if args.command == "corpus":
            print(f"embedding-client: stopped by {name}; rerun the same command to resume", file=sys.stderr)
        return 128 + signum
    finally:
        for number, before in previous.items():  # main() called in-process leaves the caller's handlers
            signal.signal(number, before)


def run() -> NoReturn:
    """The ``embedding-client`` command: ``main()``, then exit without the interpreter's finalization.

    Every file is closed and every stream cancelled and joined by the time
    ``main`` returns. What finalization would still do is garbage-collect
    gRPC's call objects (cycles since grpcio 1.83), and a call's ``__del__``
    takes its state lock, which a gRPC daemon thread frozen at shutdown may
    hold: the process hung after printing its result, about once in a few
    dozen runs (grpc/grpc#43421; faulthandler showed exactly that stack).
    """
    try:
        code: object = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    if isinstance(code, str):  # what sys.exit would print
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or file: nothing left to say
            stream.flush()
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
