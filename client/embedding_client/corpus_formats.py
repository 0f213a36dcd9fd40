"""Which reader and writer a corpus file's suffix picks: JSON Lines and .npy here, Parquet lazily.

corpus_input.py reads JSON Lines, corpus_output.py writes JSON Lines and .npy, and
corpus_parquet.py (pyarrow, imported only for a .parquet file) does both for Parquet on the
same types; the choice is made here, once, above all three.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .corpus_input import count_lines, parse_document, read_lines
from .corpus_output import CorpusOutput, CorpusOutputError, JsonlOutput, NpyOutput

SUFFIXES = (".jsonl", ".npy", ".parquet")


def count_records(path: Path) -> int:
    """The records of an input file, counted without parsing them."""
    if path.suffix == ".parquet":
        from . import corpus_parquet  # pyarrow: only for Parquet

        return corpus_parquet.count_records(path)
    return count_lines(path)


def read_records(
    path: Path, skip: int = 0, parse: Callable[[Path, int, bytes], Any] | None = None
) -> Iterator[Any]:
    """The records in file order, after the first ``skip`` (which are not parsed).

    ``parse`` reads one JSON line (default: a record; ``parse_document`` for late chunking).
    """
    if path.suffix == ".parquet":
        from . import corpus_parquet  # pyarrow: only for Parquet

        yield from corpus_parquet.read_records(path, skip, documents=parse is parse_document)
        return
    yield from read_lines(path, skip, parse)


def count_chunks(path: Path) -> int:
    """All chunks of a late-chunking corpus (parses every line: the rows of a .npy output)."""
    return sum(len(document.chunks) for document in read_records(path, parse=parse_document))


def whole_documents(path: Path, rows: int) -> tuple[int, int]:
    """Of ``rows`` chunk rows written, the documents wholly written and the rows they fill."""
    documents = filled = 0
    for document in read_records(path, parse=parse_document):
        if filled + len(document.chunks) > rows:
            break
        documents += 1
        filled += len(document.chunks)
    return documents, filled


def open_output(path: Path, records: int) -> CorpusOutput:
    """``records``: the rows the finished file holds (records, or chunks for late chunking to .npy)."""
    if path.suffix == ".jsonl":
        return JsonlOutput(path, records)
    if path.suffix == ".npy":
        return NpyOutput(path, records)
    if path.suffix == ".parquet":
        from .corpus_parquet import ParquetOutput  # pyarrow: only for Parquet

        return ParquetOutput(path, records)
    raise CorpusOutputError(f"{path}: unknown output format; use one of {', '.join(SUFFIXES)}")
