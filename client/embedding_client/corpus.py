"""``embedding-client corpus``: a JSON Lines corpus through StreamEmbed into a resumable output.

Records flow lazily: reader → client stream (bounded window, reconnects,
several replicas; requests of similar-length texts from a sliding look-ahead,
length_sort.py) → output in input order. Every reply hands out the inputs it
finished in order and they are written at once, so an interruption keeps all
the rows done but those held back by the reorder buffer (fewer than the
look-ahead), and the progress bar moves with each reply. The ids of records
in flight wait in a deque that the in-order results pop, so ids and vectors
cannot drift apart and memory stays bounded by the stream's window and the
look-ahead.
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
from .corpus_formats import count_chunks, count_records, open_output, read_records, whole_documents
from .corpus_input import parse_document, parse_record
from .corpus_output import partial_path
from .enums import task_name
from .length_sort import SortedRun


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
    late_chunking: bool = False  # each record is a document: {"id": ..., "chunks": [...]}

    def settings(self, records: int) -> dict[str, Any]:
        """What must not change between a run and its resumption."""
        settings: dict[str, Any] = {
            "input_records": records,
            "model": self.model,
            "task": task_name(self.task) if self.task else "",
            "dimensions": self.dimensions,
            "truncate": self.truncate,
        }
        if self.late_chunking:  # only when on: partial outputs of earlier versions still resume
            settings["late_chunking"] = True
        return settings


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
    client: EmbeddingClient,
    job: CorpusJob,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
    on_reply: Callable[[int, int], None] | None = None,
) -> CorpusSummary:
    """Embed ``job.input`` into ``job.output``, resuming a partial output.

    ``on_reply(embedded, written)`` is called after each reply with the records
    embedded and written so far in this run (the progress bar shows the first).
    Interrupted (KeyboardInterrupt, which the CLI also raises on SIGTERM), it
    logs how many records the partial output keeps and re-raises.
    """
    started = time.monotonic()
    if job.output.exists() and not partial_path(job.output).exists():
        log(f"{job.output} exists and is complete; nothing to do (delete it to embed again)")
        return CorpusSummary(0, 0, 0, 0.0, job.model, 0)
    records = count_records(job.input)
    chunk_rows = job.late_chunking and job.output.suffix == ".npy"  # a row per chunk, not per record
    output = open_output(job.output, count_chunks(job.input) if chunk_rows else records)
    try:
        done = output.resume(job.settings(records))
        if chunk_rows:  # rows are chunks: go on from the last whole document
            done, rows = whole_documents(job.input, done)
            output.cut_to(rows)
        if done:
            log(f"resuming: {done} of {records} records already in {output.partial}")
        ids: deque[Any] = deque()

        def texts() -> Iterator[str | list[str]]:
            parse = parse_document if job.late_chunking else parse_record
            for record in read_records(job.input, skip=done, parse=parse):
                ids.append(record.id)
                yield record.chunks if job.late_chunking else record.text

        model = job.model
        run = client.embed_stream_batches(
            texts(),
            model=job.model or None,
            task=job.task,
            dimensions=job.dimensions or None,
            truncate=job.truncate and not job.late_chunking,  # a late-chunked document is never cut
            late_chunking=job.late_chunking,
            batch_size=job.batch_size,
            window=job.window,
            streams=job.streams,
            length_sort=None if job.late_chunking else job.length_sort or None,
            priority="batch",  # a corpus job yields to interactive queries and shares fairly with others
        )
        embedded = 0

        def received() -> int:
            """Records embedded in this run: a sorted run's reorder buffer may hold some back."""
            return run.received if isinstance(run, SortedRun) else embedded

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
                if job.late_chunking:  # one reply per document, a vector per chunk
                    records_done = 1
                    # the corpus job asks for dense vectors only, so every batch has them
                    output.write_document(ids.popleft(), batch.dense)  # type: ignore[arg-type]
                else:
                    records_done = batch.count
                    # the corpus job asks for dense vectors only, so every batch has them
                    output.write([ids.popleft() for _ in range(records_done)], batch.dense)  # type: ignore[arg-type]
                embedded += records_done
                model = batch.model or model
                bar.update(done + received() - bar.n)  # embedded, written or held back for order
                if on_reply is not None:
                    on_reply(received(), embedded)
        output.finish()
        return CorpusSummary(
            records, done, embedded, time.monotonic() - started, model, run.stats.broken_attempts
        )
    except KeyboardInterrupt:
        output.close()
        saved = output.saved()
        if chunk_rows:
            saved = whole_documents(job.input, saved)[0]
        log(f"stopped: {saved} of {records} records are saved in {output.partial}")
        raise
    finally:
        output.close()
