"""Reading a JSON Lines corpus: one ``{"id": ..., "text": ...}`` object per line (Parquet: corpus_parquet.py).

Blank lines are skipped (and not counted), so counting and reading agree and a
resumed run skips exactly the records already written. A malformed line stops
the run with its line number; everything before it stays written.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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


def count_records(path: Path) -> int:
    """Non-blank lines: the number of records, read fast without parsing them."""
    if path.suffix == ".parquet":
        from . import corpus_parquet  # pyarrow: only for Parquet

        return corpus_parquet.count_records(path)
    count = 0
    with open(path, "rb") as lines:
        for raw in lines:
            if raw.strip():
                count += 1
    return count


def read_records(path: Path, skip: int = 0) -> Iterator[Record]:
    """The records in file order, after the first ``skip`` (which are not parsed)."""
    if path.suffix == ".parquet":
        from . import corpus_parquet

        yield from corpus_parquet.read_records(path, skip)
        return
    seen = 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            yield parse_record(path, number, raw)


def parse_record(path: Path, number: int, raw: bytes) -> Record:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorpusInputError(path, number, f"not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise CorpusInputError(path, number, f"expected a JSON object, got {type(value).__name__}")
    if "text" not in value:
        raise CorpusInputError(path, number, 'missing "text"')
    text = value["text"]
    if not isinstance(text, str):
        raise CorpusInputError(path, number, f'"text" must be a string, got {type(text).__name__}')
    if not text:
        raise CorpusInputError(path, number, '"text" is empty')
    return Record(line=number, id=value.get("id"), text=text)
