"""Parquet for ``embedding-client corpus``: ``id`` (optional) and ``text`` in, ``id`` and ``embedding`` out.

The same files flow between the CLI and Ray Data (``embedding_client.ray``
writes the same ``embedding`` column: ``fixed_size_list<float32>[d]``).

Reading skips whole row groups on resume and reports a bad row by its index
(0-based, as pyarrow and pandas number rows).

Writing keeps the corpus output's rule that the partial file's own length is
the progress record. A Parquet file only becomes readable when its footer is
written, so ``OUTPUT.partial`` is an Arrow IPC stream instead: the schema,
then one record batch message per write, appended and flushed. On resume the
complete messages are counted and a torn last one is cut off. ``finish``
converts the stream to Parquet in row groups of exactly
:data:`ROW_GROUP_ROWS` rows, whatever the writes were, so a resumed run's file
is byte for byte an uninterrupted run's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .corpus_input import CorpusInputError, Document, Record
from .corpus_output import ROW_DTYPE, CorpusOutput, CorpusOutputError

ROW_GROUP_ROWS = 16384
READ_BATCH_ROWS = 4096


class ParquetInputError(CorpusInputError):
    """A row (or the schema) of a Parquet input is not usable."""

    def __init__(self, path: Path, row: int | None, problem: str) -> None:
        where = "" if row is None else f" row {row}:"
        ValueError.__init__(self, f"{path}:{where} {problem}")
        self.path = path
        self.line = 0 if row is None else row + 1


def _open(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ParquetInputError(path, None, f"not a readable Parquet file ({exc})") from None


def count_records(path: Path) -> int:
    """The row count, from the footer (no data read)."""
    return int(_open(path).metadata.num_rows)


def read_records(path: Path, skip: int = 0, documents: bool = False) -> Iterator[Record | Document]:
    """The rows in file order after the first ``skip``; whole row groups before them are not read.

    ``documents`` (late chunking): each row is a document, its ``chunks`` column a list of strings.
    """
    file = _open(path)
    names = file.schema_arrow.names
    column = "chunks" if documents else "text"
    if column not in names:
        raise ParquetInputError(path, None, f'no "{column}" column (columns: {", ".join(names)})')
    kind = file.schema_arrow.field(column).type
    if documents and (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        wanted = "a list of strings" if documents else "a string column"
        raise ParquetInputError(
            path, None, f'"{column}" must be {wanted}, got {file.schema_arrow.field(column).type}'
        )
    columns = [column, "id"] if "id" in names else [column]
    row, groups = 0, list[int]()
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        if not groups and row + rows <= skip:
            row += rows
            continue
        groups.append(group)
    if not groups:
        return
    for batch in file.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=groups, columns=columns):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(texts)
        for text, id_ in zip(texts, ids, strict=True):
            if row >= skip:
                yield _document(path, row, id_, text) if documents else _record(path, row, id_, text)
            row += 1


def _record(path: Path, row: int, id_: Any, text: str | None) -> Record:
    if text is None:
        raise ParquetInputError(path, row, '"text" is null')
    if not text:
        raise ParquetInputError(path, row, '"text" is empty')
    return Record(line=row + 1, id=id_, text=text)


def _document(path: Path, row: int, id_: Any, chunks: list[str | None] | None) -> Document:
    if not chunks:
        raise ParquetInputError(path, row, '"chunks" must be a non-empty list of strings (late chunking)')
    for index, chunk in enumerate(chunks):
        if chunk is None or not chunk.strip():
            raise ParquetInputError(path, row, f'"chunks"[{index}] must be a non-blank string')
    return Document(line=row + 1, id=id_, chunks=[chunk for chunk in chunks if chunk is not None])


class ParquetOutput(CorpusOutput):
    """Rows as Arrow IPC messages in ``OUTPUT.partial``; Parquet when complete (see the module doc)."""

    def __init__(self, path: Path, records: int) -> None:
        super().__init__(path, records)
        self.schema: pa.Schema | None = None

    def _recover(self) -> int:
        rows, end, schema = 0, 0, None
        source = pa.OSFile(str(self.partial))
        try:
            while True:
                message = pa.ipc.read_message(source)
                if schema is None:
                    schema = pa.ipc.read_schema(message)
                else:
                    rows += pa.ipc.read_record_batch(message, schema).num_rows
                end = source.tell()
        except (pa.ArrowException, EOFError, OSError, ValueError):
            pass  # the end, or a message torn by a kill: everything after ``end`` goes
        finally:
            source.close()
        os.truncate(self.partial, end)
        self.schema = schema
        return rows

    def write(self, ids: Sequence[Any], dense: np.ndarray) -> None:
        self._append("embedding", ids, fixed_rows(dense))

    def write_document(self, id_: Any, chunks: np.ndarray) -> None:
        """Late chunking: one row, ``embeddings`` holding a vector per chunk."""
        offsets = pa.array([0, len(chunks)], pa.int32())
        self._append("embeddings", [id_], pa.ListArray.from_arrays(offsets, fixed_rows(chunks)))

    def _append(self, name: str, ids: Sequence[Any], vectors: pa.Array) -> None:
        assert self._file is not None
        if self.schema is None:
            id_column = self._ids(ids, None)
            self.schema = pa.schema([("id", id_column.type), (name, vectors.type)])
            self._file.write(self.schema.serialize().to_pybytes())
        elif self.schema.names[1] != name or vectors.type != self.schema.field(1).type:
            raise CorpusOutputError(
                f"{self.partial}: rows of {name}: {vectors.type} do not fit {self.schema}"
            )
        else:
            id_column = self._ids(ids, self.schema.field("id").type)
        batch = pa.record_batch([id_column, vectors], schema=self.schema)
        self._file.write(batch.serialize().to_pybytes())
        self._file.flush()
        self.rows += len(ids)

    def _ids(self, ids: Sequence[Any], kind: pa.DataType | None) -> pa.Array:
        try:
            return pa.array(list(ids), type=kind)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            wanted = f"the file's {kind}" if kind is not None else "one Parquet type"
            raise CorpusOutputError(
                f"{self.path}: ids {list(ids)[:3]}... do not fit {wanted} ({exc}); "
                "a Parquet column holds one type: use .jsonl for ids of mixed types"
            ) from None

    def finish(self) -> None:
        """The IPC stream → ``OUTPUT`` as Parquet (through a temporary file, fsynced, renamed)."""
        if self.rows != self.records:
            raise CorpusOutputError(f"{self.partial}: {self.rows} rows written, {self.records} expected")
        self.close()
        staging = self.path.with_name(self.path.name + ".partial.parquet")
        write_parquet(self.partial, staging, self.schema)
        os.replace(staging, self.path)
        self.partial.unlink()
        self.manifest.unlink(missing_ok=True)


def fixed_rows(matrix: np.ndarray, dtype: Any = ROW_DTYPE) -> pa.FixedSizeListArray:
    """An ``[n, d]`` matrix as n fixed-size lists, without a copy per row (also embedding_client.ray's)."""
    rows = np.ascontiguousarray(matrix, dtype=dtype)
    width = rows.shape[1] if rows.ndim == 2 else 0
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), width)


EMPTY_SCHEMA = pa.schema([("id", pa.null()), ("embedding", pa.list_(pa.float32(), 0))])


def write_parquet(stream: Path, destination: Path, schema: pa.Schema | None) -> None:
    """Copy an IPC stream of record batches into Parquet row groups of :data:`ROW_GROUP_ROWS` rows."""
    with pq.ParquetWriter(destination, schema or EMPTY_SCHEMA) as writer:
        if schema is not None:
            with pa.OSFile(str(stream)) as source:
                pending: list[pa.RecordBatch] = []
                held = 0
                for batch in pa.ipc.open_stream(source):
                    pending.append(batch)
                    held += batch.num_rows
                    while held >= ROW_GROUP_ROWS:
                        table = pa.Table.from_batches(pending, schema)
                        writer.write_table(table.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
                        pending = table.slice(ROW_GROUP_ROWS).to_batches()
                        held -= ROW_GROUP_ROWS
                if held:
                    writer.write_table(pa.Table.from_batches(pending, schema), row_group_size=ROW_GROUP_ROWS)
    with open(destination, "rb+") as written:
        os.fsync(written.fileno())
