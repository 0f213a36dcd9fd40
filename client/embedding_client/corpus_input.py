"""Reading a JSON Lines corpus: one ``{"id": ..., "text": ...}`` object per line (Parquet: corpus_parquet.py).

For late chunking a line is one document, ``{"id": ..., "chunks": ["...", ...]}``:
its chunks are embedded together, each vector pooled from token states that
saw the whole document.

Blank lines are skipped (and not counted), so counting and reading agree and a
resumed run skips exactly the records already written. A malformed line stops
the run with its line number; everything before it stays written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CorpusInputError(ValueError):
    """A line of the input is not a usable record."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class Record:
    line: int
    id: Any
    text: str


@dataclass(frozen=True)
class Document:
    """A late-chunking record: the chunks of one document, in order."""

    line: int
    id: Any
    chunks: list[str]


def count_lines(path: Path) -> int:
    """Non-blank lines: the number of records, read fast without parsing them."""
    count = 0
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.strip():
                count += 1
    return count


def read_lines(
    path: Path, skip: int = 0, parse: Callable[[Path, int, bytes], Any] | None = None
) -> Iterator[Any]:
    """The records in file order, after the first ``skip`` (which are not parsed).

    ``parse`` reads one line (default :func:`parse_record`; :func:`parse_document` for late chunking).
    """
    parse = parse or parse_record
    seen = 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            yield parse(path, number, raw)


def _json_object(path: Path, number: int, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusInputError(path, number, f"not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise CorpusInputError(path, number, f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_record(path: Path, number: int, raw: bytes) -> Record:
    value = _json_object(path, number, raw)
    if "text" not in value:
        raise CorpusInputError(path, number, 'missing "text"')
    text = value["text"]
    if not isinstance(text, str):
        raise CorpusInputError(path, number, f'"text" must be a string, got {type(text).__name__}')
    if not text:
        raise CorpusInputError(path, number, '"text" is empty')
    return Record(line=number, id=value.get("id"), text=text)


def parse_document(path: Path, number: int, raw: bytes) -> Document:
    """A ``{"id": ..., "chunks": [...]}`` line: a non-empty list of non-blank strings."""
    value = _json_object(path, number, raw)
    chunks = value.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise CorpusInputError(path, number, '"chunks" must be a non-empty list of strings (late chunking)')
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, str) or not chunk.strip():
            raise CorpusInputError(path, number, f'"chunks"[{index}] must be a non-blank string')
    return Document(line=number, id=value.get("id"), chunks=chunks)
