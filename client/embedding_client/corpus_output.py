"""Resumable corpus outputs: rows appended in input order to ``OUTPUT.partial``, renamed when complete.

The file's own length is the progress record, so there is no counter to get
out of step with the data: on restart the complete rows are counted, a torn
last row (the process was killed mid-write) is cut off, and the run goes on
from the next record. Rows are the same bytes whether written in one run or
several, so the finished file is identical to an uninterrupted run's.

- ``.jsonl``: one ``{"id": ..., "embedding": [...]}`` line per record; the
  rows done are the complete lines. With late chunking a record is a
  document and its line is ``{"id": ..., "embeddings": [[...], ...]}``, one
  vector per chunk in chunk order.
- ``.npy``: the final ``.npy`` header (shape ``[records, d]``, float32,
  exactly what ``np.save`` writes) and then raw rows; the rows done are
  ``(size - header) // (4 * d)``. The header needs the record count, hence
  the counting pass over the input; ``d`` comes from the first reply. With
  late chunking a row is a chunk (the counting pass adds up the chunks), and a
  resume cuts the rows back to the last whole document.
- ``.parquet``: columns ``id`` and ``embedding`` (late chunking: ``id`` and
  ``embeddings``, a list of vectors per document); the partial file is an
  Arrow IPC stream whose complete messages are the rows done (corpus_parquet.py).

A small ``OUTPUT.partial.json`` remembers the settings of the run (model,
task, dimensions, truncation, record count) so that a resume with different
settings is refused instead of mixing two kinds of vectors in one file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROW_DTYPE = np.dtype("<f4")


class CorpusOutputError(ValueError):
    """The output cannot be written or resumed as asked."""


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial.json")


class CorpusOutput:
    """Base: the partial file, its manifest, resume and the final rename."""

    def __init__(self, path: Path, records: int) -> None:
        self.path = path
        self.records = records
        self.partial = partial_path(path)
        self.manifest = manifest_path(path)
        self.rows = 0
        self._file: BinaryIO | None = None

    def resume(self, settings: dict[str, Any]) -> int:
        """Open the partial output (creating it if new); returns the rows already complete."""
        if self.partial.exists():
            self._check_manifest(settings)
            self.rows = self._recover()
        else:
            self.manifest.write_text(json.dumps(settings, sort_keys=True))
            self.partial.write_bytes(b"")
            self.rows = 0
        if self.rows > self.records:
            raise CorpusOutputError(
                f"{self.partial} has {self.rows} rows but the input has {self.records} records; "
                "it belongs to another input: delete it to start over"
            )
        self._file = open(self.partial, "r+b")  # noqa: SIM115 (kept open across writes)
        self._file.seek(0, os.SEEK_END)
        return self.rows

    def _check_manifest(self, settings: dict[str, Any]) -> None:
        try:
            previous = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != settings:
            raise CorpusOutputError(
                f"{self.partial} was started with other settings ({previous}); rerun with those, "
                f"or delete {self.partial} and {self.manifest} to start over with {settings}"
            )

    def _recover(self) -> int:
        raise NotImplementedError

    def saved(self) -> int:
        """After :meth:`close`: the complete rows the partial file holds, read from the file itself
        (a row torn by an interruption is cut off, as a resume would)."""
        return self._recover() if self.partial.exists() else 0

    def write(self, ids: Sequence[Any], dense: np.ndarray) -> None:
        raise NotImplementedError

    def write_document(self, id_: Any, chunks: np.ndarray) -> None:
        """Late chunking: one document's chunk vectors [chunks, d]."""
        raise NotImplementedError

    def cut_to(self, rows: int) -> None:
        """Drop the rows after ``rows`` (a resume back to a document boundary)."""
        raise NotImplementedError

    def finish(self) -> None:
        """All rows written: make them durable and give the file its final name."""
        assert self._file is not None
        if self.rows != self.records:
            raise CorpusOutputError(f"{self.partial}: {self.rows} rows written, {self.records} expected")
        self._prepare_final()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.partial, self.path)
        self.manifest.unlink(missing_ok=True)

    def _prepare_final(self) -> None:
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None


class JsonlOutput(CorpusOutput):
    def _recover(self) -> int:
        with open(self.partial, "r+b") as data:
            content_end = _last_newline_end(data)
            data.truncate(content_end)
            data.seek(0)
            return sum(chunk.count(b"\n") for chunk in iter(lambda: data.read(1 << 20), b""))

    def write(self, ids: Sequence[Any], dense: np.ndarray) -> None:
        self._write_lines(
            [{"id": id_, "embedding": row} for id_, row in zip(ids, dense.tolist(), strict=True)]
        )

    def write_document(self, id_: Any, chunks: np.ndarray) -> None:
        self._write_lines([{"id": id_, "embeddings": chunks.tolist()}])

    def _write_lines(self, rows: list[dict[str, Any]]) -> None:
        assert self._file is not None
        lines = [json.dumps(row, separators=(", ", ": ")).encode() + b"\n" for row in rows]
        self._file.write(b"".join(lines))
        self._file.flush()
        self.rows += len(lines)


class NpyOutput(CorpusOutput):
    def __init__(self, path: Path, records: int) -> None:
        super().__init__(path, records)
        self.dimensions: int | None = None
        self.header_bytes = 0

    def _recover(self) -> int:
        with open(self.partial, "r+b") as data:
            size = os.fstat(data.fileno()).st_size
            try:
                np.lib.format.read_magic(data)
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(data)
            except (ValueError, OSError, EOFError):
                data.truncate(0)  # killed while writing the header: no rows yet
                return 0
            if fortran or dtype != ROW_DTYPE or len(shape) != 2 or shape[0] != self.records:
                raise CorpusOutputError(
                    f"{self.partial}: header {shape} {dtype} does not fit {self.records} float32 rows; "
                    "delete it to start over"
                )
            self.dimensions = int(shape[1])
            self.header_bytes = data.tell()
            row_bytes = 4 * self.dimensions
            rows = (size - self.header_bytes) // row_bytes
            data.truncate(self.header_bytes + rows * row_bytes)
            return int(rows)

    def write(self, ids: Sequence[Any], dense: np.ndarray) -> None:
        assert self._file is not None
        if self.dimensions is None:
            self.dimensions = int(dense.shape[1])
            shape = (self.records, self.dimensions)
            header = {"descr": ROW_DTYPE.str, "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(self._file, header)
            self.header_bytes = self._file.tell()
        if dense.shape[1] != self.dimensions:
            raise CorpusOutputError(f"a reply has {dense.shape[1]} dimensions, the file {self.dimensions}")
        self._file.write(np.ascontiguousarray(dense, dtype=ROW_DTYPE).tobytes())
        self._file.flush()
        self.rows += len(dense)

    def write_document(self, id_: Any, chunks: np.ndarray) -> None:
        self.write([id_] * len(chunks), chunks)

    def cut_to(self, rows: int) -> None:
        assert self._file is not None and rows <= self.rows
        if rows < self.rows:
            assert self.dimensions is not None
            self._file.truncate(self.header_bytes + rows * 4 * self.dimensions)
            self._file.seek(0, os.SEEK_END)
            self.rows = rows

    def _prepare_final(self) -> None:
        if self.dimensions is None:  # an empty corpus: a valid (0, 0) array
            assert self._file is not None
            header = {"descr": ROW_DTYPE.str, "fortran_order": False, "shape": (0, 0)}
            np.lib.format.write_array_header_1_0(self._file, header)


def _last_newline_end(data: BinaryIO) -> int:
    """The offset just after the file's last newline (0 if none): the end of its complete lines."""
    end = data.seek(0, os.SEEK_END)
    position = end
    while position > 0:
        start = max(0, position - (1 << 16))
        data.seek(start)
        chunk = data.read(position - start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0
