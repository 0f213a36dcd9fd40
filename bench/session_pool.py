"""Which session pool layout is fastest and leanest on this machine?

Runs the built-in model on the same length-sorted batches in three layouts,
each in a fresh subprocess so peak RSS is its own, and prints them side by side:

  one-session x1   1 session, all cores as intra-op threads, 1 run at a time
  shared xN        1 session, N concurrent runs, cores/N threads each
  separate xN      N sessions, 1 run each, cores/N threads each

    python bench/session_pool.py [--seconds 8] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sentences

LAYOUTS = {
    "one-session x1": dict(sessions=1, concurrent=1, shared=True),
    "shared xN": dict(sessions=None, concurrent=None, shared=True),
    "separate xN": dict(sessions=None, concurrent=None, shared=False),
}


def measure(sessions: int, concurrent: int, shared: bool, seconds: float) -> dict[str, float]:
    """In this process: throughput (sequences/s) of the layout on sorted batches of 16."""
    import numpy as np
    from embedding_server.models.loader import BUILTIN_MODEL, ModelSpec, load

    cores = os.cpu_count() or 1
    threads = max(1, cores // concurrent)
    layout = "shared" if shared else "separate"
    loaded = load(ModelSpec(BUILTIN_MODEL, None), sessions=sessions, threads=threads, layout=layout)
    pool, model = loaded.sessions, loaded.model
    encoded = sorted(model.tokenize(sentences(512, 5, 60, seed=4), 0, True), key=len)
    batches = []
    for start in range(0, len(encoded), 16):
        rows = encoded[start : start + 16]
        longest = max(len(r) for r in rows)
        ids = np.full((len(rows), longest), model.tokenizer.pad_id, np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        batches.append(model.feeds(ids, mask, 0))

    def worker(slot: int) -> int:
        done, i = 0, slot
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            feeds = batches[i % len(batches)]
            pool.run(slot, model.output_names, feeds)
            done += feeds["input_ids"].shape[0]
            i += concurrent
        return done

    worker(0)  # warm-up
    started = time.monotonic()
    with ThreadPoolExecutor(concurrent) as threads_pool:
        total = sum(threads_pool.map(worker, range(concurrent)))
    elapsed = time.monotonic() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"throughput": total / elapsed, "rss_mb": rss_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    parser.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(spec["sessions"], spec["concurrent"], spec["shared"], args.seconds)))
        return
    n = args.concurrency
    print(
        f"cores={os.cpu_count()} N={n} {args.seconds}s x {args.rounds} interleaved rounds, "
        "each layout in its own process; medians"
    )
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name, layout in LAYOUTS.items():
            spec = {k: (n if v is None else v) for k, v in layout.items()}
            out = subprocess.run(
                [sys.executable, __file__, "--seconds", str(args.seconds), "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
            )
            samples[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    base = results["one-session x1"]
    print(f"{'layout':<16} {'seq/s':>8} {'vs x1':>7} {'peak RSS MB':>12} {'vs x1':>7}")
    for name, r in results.items():
        print(
            f"{name:<16} {r['throughput']:8.1f} {r['throughput'] / base['throughput']:7.2f} "
            f"{r['rss_mb']:12.0f} {r['rss_mb'] / base['rss_mb']:7.2f}"
        )


if __name__ == "__main__":
    main()
