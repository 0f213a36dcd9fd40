"""One server for both of its users: queries while a corpus job runs, fair shares, peak memory.

    python bench/mixed.py                       # this checkout
    python bench/mixed.py --before /work/main   # and another checkout's server, side by side

For each server (``--before``: the same steps against the server code of
another checkout, run from its ``server/`` and ``client/`` directories, one
variant after the other in this one run):

- idle: single short ``Embed`` queries one after another: p50/p99, next to the
  in-process all-cores time of the same query (tokenize + run + pool, no server);
  then the same query through the REST shim (``POST /v1/embeddings``);
- a corpus job through ``embedding-client corpus`` (1,600 passages of 80-200
  words) alone, then again with an open-loop client sending one short query
  with ``Embed`` every 100 ms: query p50/p99/max under the job, and the job's
  throughput with the queries against alone (ratio);
- two corpus jobs at once from two processes, each on half the corpus (one
  sends requests of 16 passages, the other of 64): each one's share of the
  passages embedded while both ran;
- the server's peak RSS (VmHWM) after all that, and on a fresh server after
  four concurrent ``Embed`` calls of 128 passages of ~256 tokens (truncate).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkout_env, percentile, sentences, start_server
from embedding_client.proto import embedding_pb2 as pb
from embedding_client.proto import embedding_pb2_grpc

QUERY = "how do I reset my password"
QUERY_RATE = 10.0  # per second, open loop


def private_stub(target: str) -> embedding_pb2_grpc.EmbeddingServiceStub:
    """A stub on its own connection (channels of one process share connections otherwise)."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    return embedding_pb2_grpc.EmbeddingServiceStub(channel)


def idle_latency(target: str, count: int = 200) -> list[float]:
    stub = private_stub(target)
    for _ in range(20):
        stub.Embed(pb.EmbedRequest(inputs=[QUERY]), timeout=30)
    out = []
    for _ in range(count):
        started = time.perf_counter()
        stub.Embed(pb.EmbedRequest(inputs=[QUERY]), timeout=30)
        out.append((time.perf_counter() - started) * 1000)
    return out


def rest_idle_latency(port: int, count: int = 200) -> list[float]:
    """The same query through the REST shim (``POST /v1/embeddings``), one keep-alive connection.

    The client is the standard library's ``http.client``: its own cost is a
    fraction of a millisecond, so the figure is the server's (httpx or the
    ``openai`` client add their own milliseconds on the caller's side).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port)
    body = json.dumps({"input": QUERY, "model": "all-minilm-l6-v2"})
    headers = {"Content-Type": "application/json"}

    def call() -> None:
        connection.request("POST", "/v1/embeddings", body, headers)
        reply = connection.getresponse()
        data = reply.read()
        if reply.status != 200:
            raise RuntimeError(f"REST {reply.status}: {data[:200]!r}")

    for _ in range(20):
        call()
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    connection.close()
    return out


def in_process_latency(count: int = 200) -> list[float]:
    """The same query without a server, on every core: tokenize, run, pool (bench/run.py's ceiling code)."""
    from run import embed_in_process, load_builtin

    loaded = load_builtin()
    out = []
    for i in range(count + 20):
        started = time.perf_counter()
        embed_in_process(loaded, [QUERY])
        if i >= 20:
            out.append((time.perf_counter() - started) * 1000)
    return out


class OpenLoopQueries:
    """One short Embed every 1/QUERY_RATE s, whatever the previous ones are doing."""

    def __init__(self, target: str) -> None:
        self.stub = private_stub(target)
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pending = []
        start = time.perf_counter()
        n = 0
        while not self._stop.is_set():
            due = start + n / QUERY_RATE
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent = time.perf_counter()
            future = self.stub.Embed.future(pb.EmbedRequest(inputs=[QUERY]), timeout=60)
            future.add_done_callback(lambda f, sent=sent: self._done(f, sent))
            pending.append(future)
            n += 1
        for future in pending:
            with contextlib.suppress(grpc.RpcError):
                future.result()

    def _done(self, future: grpc.Future, sent: float) -> None:
        if future.exception() is None:
            self.latencies.append((time.perf_counter() - sent) * 1000)
        else:
            self.errors += 1

    def __enter__(self) -> OpenLoopQueries:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def corpus_job(target: str, corpus: Path, output: Path, env: dict[str, str]) -> float:
    """Passages per second of ``embedding-client corpus``."""
    command = [sys.executable, "-m", "embedding_client.cli", "corpus", str(corpus), str(output)]
    command += ["--target", target, "--no-progress"]
    output.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True)
    count = sum(1 for line in corpus.read_text().splitlines() if line.strip())
    return count / (time.perf_counter() - started)


def job_child(target: str, corpus: Path, batch_size: int) -> None:
    """A corpus job through the client library (what the CLI runs); prints when each passage was done."""
    from embedding_client import EmbeddingClient

    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    stamps = []
    kwargs = (
        {"priority": "batch"}
        if "priority" in EmbeddingClient.embed_stream_batches.__code__.co_varnames
        else {}
    )
    # Closed before the interpreter exits: once, a job left its channel open and hung at exit, its
    # main thread in gRPC's _MultiThreadedRendezvous.__del__ (garbage collection at finalization).
    with (
        channel,
        EmbeddingClient(target, channel=channel) as client,
        client.embed_stream_batches(texts, batch_size=batch_size, **kwargs) as run,
    ):
        for result in run:
            stamps.append((time.time(), len(result)))
    print(json.dumps(stamps), flush=True)


def two_jobs(target: str, corpus: Path, env: dict[str, str]) -> tuple[float, float]:
    """Each job's share of the passages embedded while both ran."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "job", target, str(corpus), str(size)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for size in (16, 64)
    ]
    stamps = [json.loads(p.communicate()[0]) for p in procs]
    both_until = min(s[-1][0] for s in stamps)  # the first job to finish
    both_from = max(s[0][0] for s in stamps)  # both had work answered
    done = [sum(n for t, n in s if both_from <= t <= both_until) for s in stamps]
    total = sum(done) or 1
    return done[0] / total, done[1] / total


def peak_256(checkout: Path | None, flags: Sequence[str] = ()) -> float:
    """VmHWM after four concurrent Embed calls of 128 passages of ~256 tokens (truncate)."""
    server = start_server(*flags, rest=False, checkout=checkout)
    try:
        stub = private_stub(server.target)
        texts = sentences(128, 300, 320, seed=7)
        futures = [
            stub.Embed.future(pb.EmbedRequest(inputs=texts, truncate=True), timeout=600) for _ in range(4)
        ]
        for future in futures:
            try:
                future.result()
            except grpc.RpcError as error:
                print(f"    256-token call: {error.code().name}: {error.details()}")
        return server.peak_rss_mb()
    finally:
        server.stop()


def variant(
    name: str, checkout: Path | None, corpus: Path, workdir: Path, flags: Sequence[str] = ()
) -> dict[str, object]:
    half = workdir / "half.jsonl"  # each of the two concurrent jobs embeds half the corpus
    lines = corpus.read_text().splitlines(keepends=True)
    half.write_text("".join(lines[: len(lines) // 2]))
    env = checkout_env(checkout)  # the corpus jobs' clients are of the same version as the server
    server = start_server(*flags, rest=True, checkout=checkout)  # /metrics on the REST port
    print(f"  [{name}] server pid {server.process.pid}, metrics on :{server.rest_port}", flush=True)
    try:
        idle = idle_latency(server.target)
        rest_idle = rest_idle_latency(server.rest_port)
        alone = corpus_job(server.target, corpus, workdir / "alone.npy", env)
        with OpenLoopQueries(server.target) as queries:
            mixed = corpus_job(server.target, corpus, workdir / "mixed.npy", env)
        shares = two_jobs(server.target, half, env)
        peak = server.peak_rss_mb()
    finally:
        server.stop()
    peak256 = peak_256(checkout, flags)
    q = queries.latencies
    return {
        "name": name,
        "idle_p50": percentile(idle, 50),
        "idle_p99": percentile(idle, 99),
        "rest_p50": percentile(rest_idle, 50),
        "rest_p99": percentile(rest_idle, 99),
        "q_p50": percentile(q, 50),
        "q_p99": percentile(q, 99),
        "q_max": max(q) if q else float("nan"),
        "q_n": len(q),
        "q_errors": queries.errors,
        "alone": alone,
        "mixed": mixed,
        "shares": shares,
        "peak": peak,
        "peak256": peak256,
    }


def corpus_bench(doc: str, passages: int, seed: int) -> tuple[argparse.Namespace, Path, Path]:
    """The arguments (``--passages``, ``--before``), a work directory and its corpus of JSONL passages
    of 80-200 words, for a bench that runs corpus jobs against this checkout and maybe another."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=passages)
    parser.add_argument("--before", type=Path, default=None, help="another checkout to compare with")
    parser.add_argument(
        "--compare-flags",
        default=None,
        help='this checkout again with these server flags, e.g. "--engine onnxruntime --precision fp32"',
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    corpus = workdir / "corpus.jsonl"
    texts = sentences(args.passages, 80, 200, seed=seed)
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return args, workdir, corpus


def main() -> None:
    args, workdir, corpus = corpus_bench(__doc__ or "", passages=1600, seed=3)
    in_process = statistics.median(in_process_latency())
    cores = len(os.sched_getaffinity(0))
    print(f"{args.passages} passages of 80-200 words, {cores} cores, default model and flags")
    print(f"in-process all-cores single query: p50 {in_process:.1f} ms", flush=True)
    variants: list[tuple[str, Path | None, list[str]]] = [("this checkout", None, [])]
    if args.compare_flags:
        flags = shlex.split(args.compare_flags)
        variants.append((f"this checkout {args.compare_flags}", None, flags))
    if args.before is not None:
        variants.append((f"before ({args.before})", args.before.resolve(), []))
    for name, checkout, flags in variants:
        report(variant(name, checkout, corpus, workdir, flags), in_process)


def report(r: dict[str, object], in_process: float) -> None:
    a, b = r["shares"]  # type: ignore[misc]
    print(f"\n[{r['name']}]")
    for api, key in (("gRPC", "idle"), ("REST", "rest")):
        p50, p99 = r[f"{key}_p50"], r[f"{key}_p99"]
        print(
            f"  idle query ({api})       p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   "
            f"in-process {p50 - in_process:+.1f} ms"  # type: ignore[operator]
        )
    print(
        f"  query under corpus job  p50 {r['q_p50']:7.1f} ms   p99 {r['q_p99']:7.1f} ms   "
        f"max {r['q_max']:7.1f} ms   ({r['q_n']} answered, {r['q_errors']} errors)"
    )
    print(
        f"  corpus job              alone {r['alone']:6.1f} passages/s   "
        f"with queries {r['mixed']:6.1f}   ratio {r['mixed'] / r['alone']:.2f}"  # type: ignore[operator]
    )
    print(f"  two corpus jobs         shares {a:.2f} (requests of 16) / {b:.2f} (requests of 64)")
    print(
        f"  peak RSS (VmHWM)        after the above {r['peak']:6.0f} MiB;  "
        f"4 x 128 x 256 tokens {r['peak256']:6.0f} MiB",
        flush=True,
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "job":
        job_child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
