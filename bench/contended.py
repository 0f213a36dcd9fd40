"""A corpus job on a machine another process keeps busy: does bulk work still get its share?

    python bench/contended.py                       # this checkout
    python bench/contended.py --before /work/old    # and another checkout's server, side by side

For each server (``--before``: another checkout's ``server/`` and ``client/``
code, one variant after the other in this one run), ``embedding-client corpus``
embeds the same passages (default 300, 80-200 words):

- alone;
- while one CPU hog per core (``while True: pass`` at normal priority, the
  same cgroup) runs: a noisy neighbour in the pod, or a shared VM;
- with the hogs and an open-loop client sending one short query every 100 ms,
  whose latency is reported too.

Printed: passages/s of each, the hogged/alone ratio, and this/before. Bulk
threads run at nice 10, and a thread at nice 10 gets ~1/10 of a core it
shares with a nice-0 process: this measures what that costs a corpus job on
a machine it shares (and what a change to it would win).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkout_env, percentile, start_server
from mixed import OpenLoopQueries, corpus_bench, corpus_job


@contextmanager
def hogs() -> Iterator[None]:
    """One busy process per core, at normal priority, for as long as the block runs."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def variant(checkout: Path | None, corpus: Path, workdir: Path) -> dict[str, float]:
    env = checkout_env(checkout)  # the corpus jobs' clients are of the same version as the server
    server = start_server(rest=False, checkout=checkout)
    try:
        alone = corpus_job(server.target, corpus, workdir / "alone.npy", env)
        with hogs():
            hogged = corpus_job(server.target, corpus, workdir / "hogged.npy", env)
            with OpenLoopQueries(server.target) as queries:
                with_queries = corpus_job(server.target, corpus, workdir / "queries.npy", env)
    finally:
        server.stop()
    q = queries.latencies
    return {
        "alone": alone,
        "hogged": hogged,
        "with_queries": with_queries,
        "q_p50": percentile(q, 50),
        "q_p99": percentile(q, 99),
        "q_errors": queries.errors,
    }


def main() -> None:
    args, workdir, corpus = corpus_bench(__doc__ or "", passages=300, seed=5)
    cores = len(os.sched_getaffinity(0))
    print(f"{args.passages} passages of 80-200 words, {cores} cores, {cores} CPU hogs at nice 0")
    results = {"this checkout": variant(None, corpus, workdir)}
    if args.before is not None:
        results[f"before ({args.before})"] = variant(args.before.resolve(), corpus, workdir)
    for name, r in results.items():
        print(f"\n[{name}]")
        print(f"  corpus alone                {r['alone']:7.1f} passages/s")
        print(
            f"  corpus beside the hogs      {r['hogged']:7.1f} passages/s   "
            f"{r['hogged'] / r['alone']:.2f} of alone"
        )
        print(
            f"  ... and queries at 10/s     {r['with_queries']:7.1f} passages/s   "
            f"{r['with_queries'] / r['alone']:.2f} of alone;  query p50 {r['q_p50']:.1f} ms, "
            f"p99 {r['q_p99']:.1f} ms, {r['q_errors']:.0f} errors"
        )
    if args.before is not None:
        this, before = results.values()
        ratios = (f"{k} {this[k] / before[k]:.2f}" for k in ("alone", "hogged", "with_queries"))
        print("\nthis/before: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
