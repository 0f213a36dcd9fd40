"""``embedding-client corpus``: a JSON Lines corpus through StreamEmbed into a resumable output.

Records flow lazily: reader → client stream (bounded window, reconnects,
several replicas) → output in input order. The ids of records in flight wait
in a deque that the in-order results pop, so ids and vectors cannot drift
apart and memory stays bounded by the stream's window.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .client import EmbeddingClient
from .corpus_input import count_records, read_records
from .corpus_output import open_output, partial_path
from .enums import task_name


@dataclass(frozen=True)
class CorpusJob:
    input: Path
    output: Path
    model: str = ""
    task: int = 0
    dimensions: int = 0
    truncate: bool = True
    batch_size: int = 64
    window: int = 8
    streams: int = 1
    length_sort: int = 0  # 0: requests of consecutive records
    progress: bool = True

    def settings(self, records: int) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        return {
            "input_records": records,
            "model": self.model,
            "task": task_name(self.task) if self.task else "",
            "dimensions": self.dimensions,
            "truncate": self.truncate,
        }


@dataclass(frozen=True)
class CorpusSummary:
    records: int
    skipped: int
    embedded: int
    seconds: float
    model: str
    reconnects: int

    @property
    def rate(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def run_corpus(
    client: EmbeddingClient, job: CorpusJob, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)
) -> CorpusSummary:
    started = time.monotonic()
    if job.output.exists() and not partial_path(job.output).exists():
        log(f"{job.output} exists and is complete; nothing to do (delete it to embed again)")
        return CorpusSummary(0, 0, 0, 0.0, job.model, 0)
    records = count_records(job.input)
    output = open_output(job.output, records)
    try:
        done = output.resume(job.settings(records))
        if done:
            log(f"resuming: {done} of {records} records already in {output.partial}")
        ids: deque[Any] = deque()

        def texts() -> Iterator[str]:
            for record in read_records(job.input, skip=done):
                ids.append(record.id)
                yield record.text

        model = job.model
        run = client.embed_stream_batches(
            texts(),
            model=job.model or None,
            task=job.task,
            dimensions=job.dimensions or None,
            truncate=job.truncate,
            batch_size=job.batch_size,
            window=job.window,
            streams=job.streams,
            length_sort=job.length_sort or None,
            priority="batch",  # a corpus job yields to interactive queries and shares fairly with others
        )
        embedded = 0
        with (
            run,
            tqdm(
                total=records,
                initial=done,
                unit=" items",
                dynamic_ncols=True,
                smoothing=0.1,
                mininterval=0.5,
                disable=not job.progress,
                desc="embedding",
            ) as bar,
        ):
            for batch in run:
                batch_ids = [ids.popleft() for _ in range(batch.count)]
                output.write(batch_ids, batch.dense)  # type: ignore[arg-type]
                embedded += batch.count
                model = batch.model or model
                bar.update(batch.count)
        output.finish()
        return CorpusSummary(
            records, done, embedded, time.monotonic() - started, model, run.stats.broken_attempts
        )
    finally:
        output.close()
