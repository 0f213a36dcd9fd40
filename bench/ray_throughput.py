"""Ray Data (both modes of embedding_client.ray) against ``embedding-client corpus``, in one run.

    python bench/ray_throughput.py                       # 3000 texts of 5-60 words, 3 rounds
    python bench/ray_throughput.py --texts 20000 --actors 4 --rounds 5

The same Parquet corpus (``id``, ``text``) goes, in alternating rounds, through:

- cli: ``embedding-client corpus docs.parquet out.parquet`` against one
  ``embedding-server`` (a process of its own: start-up, reading, writing
  included);
- ray service: examples/ray_parquet.py with ``target=`` the same server
  (``--actors`` client actors of 0.25 CPU each, StreamEmbed, batch priority);
- ray in-process: examples/ray_parquet.py with ``engine_args=[]`` (``--actors``
  actors of one CPU, each loading the model with the server's engine; Ray
  gets one logical CPU more than the cores for the read and write tasks).

Every number is wall time from start to the last row on disk, so the Ray runs
pay for starting their actors (and loading the model in-process) each time, as
a job would. Medians over the rounds; ratios against the CLI. The vectors of
all three are compared (cosine >= 0.9999) before any number is printed. Peak
RSS (VmHWM): the server, the CLI process, and the largest Ray actor.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import runpy
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sentences, start_server

ROOT = Path(__file__).resolve().parents[1]


def map_workers() -> list[Path]:
    """The /proc entries of Ray Data's map actors."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if b"MapWorker" in (proc / "cmdline").read_bytes():
                found.append(proc)
        except OSError:
            continue
    return found


class ActorPeak:
    """The largest VmHWM of a Ray map actor of this run (sampled from /proc; the actors of an
    earlier run, which Ray may still be ending, are left out)."""

    def __init__(self) -> None:
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._earlier: set[Path] = set()

    def __enter__(self) -> ActorPeak:
        self._earlier = set(map_workers())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for proc in set(map_workers()) - self._earlier:
                try:
                    status = (proc / "status").read_text()
                except OSError:
                    continue
                found = re.search(r"VmHWM:\s+(\d+) kB", status)
                if found:
                    self.peak_kb = max(self.peak_kb, int(found.group(1)))


def vectors(path: Path) -> np.ndarray:
    """The vectors in id order (Ray's files need not be named in input order)."""
    column = pq.read_table(path).sort_by("id").column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="Ray actors per mode")
    args = parser.parse_args()

    texts = sentences(args.texts, 5, 60, seed=7)
    workdir = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    source = workdir / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source, row_group_size=1000)
    embed_parquet = runpy.run_path(str(ROOT / "examples" / "ray_parquet.py"))["embed_parquet"]
    cpus = os.cpu_count() or 1
    # One logical CPU more than the cores: in-process actors take a CPU each, and the read and write
    # tasks need one too (with every CPU held by an actor, the read never starts).
    ray.init(
        num_cpus=cpus + 1, object_store_memory=300 * 1024**2, include_dashboard=False, log_to_driver=False
    )
    server = start_server(rest=False)
    rates: dict[str, list[float]] = {"cli": [], "ray service": [], "ray in-process": []}
    outputs = {name: workdir / name.replace(" ", "-") for name in rates}
    peaks = {"ray service": ActorPeak(), "ray in-process": ActorPeak()}

    def cli() -> None:
        out = outputs["cli"] / "out.parquet"
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "embedding_client.cli", "corpus", str(source), str(out)]
        subprocess.run(
            [*command, "--target", server.target, "--no-progress"], check=True, capture_output=True
        )

    def service() -> None:
        with peaks["ray service"]:
            embed_parquet(str(source), str(outputs["ray service"]), target=server.target, actors=args.actors)

    def in_process() -> None:
        with peaks["ray in-process"]:
            embed_parquet(str(source), str(outputs["ray in-process"]), engine_args=[], actors=args.actors)

    runs = {"cli": cli, "ray service": service, "ray in-process": in_process}
    try:
        for round_ in range(args.rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            for name in order:
                for stale in outputs[name].glob("*.parquet") if outputs[name].exists() else []:
                    stale.unlink()
                rates[name].append(len(texts) / timed(runs[name]))
            print("round", round_ + 1, "  ".join(f"{n} {rates[n][-1]:.0f}/s" for n in rates), flush=True)
        reference = vectors(outputs["cli"] / "out.parquet")
        for name in ("ray service", "ray in-process"):
            got = vectors(outputs[name])
            cosine = (
                (got * reference).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
            )
            assert cosine.min() >= 0.9999, f"{name}: cosine {cosine.min()}"
        server_peak = server.peak_rss_mb()
        cli_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the CLI runs (ended)
    finally:
        server.stop()
        ray.shutdown()

    medians = {name: statistics.median(values) for name, values in rates.items()}
    print()
    print(
        f"corpus: {len(texts)} texts of 5-60 words (Parquet), {cpus} cores, all-minilm-l6-v2, "
        f"{args.actors} actors"
    )
    for name, rate in medians.items():
        print(f"{name:16s} {rate:8.0f} texts/s   ratio to cli {rate / medians['cli']:.2f}")
    print(f"peak RSS: server {server_peak:.0f} MiB, cli process {cli_peak:.0f} MiB (largest child), ", end="")
    print(", ".join(f"{n} actor {p.peak_kb / 1024:.0f} MiB" for n, p in peaks.items()))


if __name__ == "__main__":
    main()
