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

from .corpus_input import CorpusInputError, Record
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


def read_records(path: Path, skip: int = 0) -> Iterator[Record]:
    """The rows in file order after the first ``skip``; whole row groups before them are not read."""
    file = _open(path)
    names = file.schema_arrow.names
    if "text" not in names:
        raise ParquetInputError(path, None, f'no "text" column (columns: {", ".join(names)})')
    text_type = file.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise ParquetInputError(path, None, f'"text" must be a string column, got {text_type}')
    columns = ["text", "id"] if "id" in names else ["text"]
    row, groups = 0, []
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
                if text is None:
                    raise ParquetInputError(path, row, '"text" is null')
                if not text:
                    raise ParquetInputError(path, row, '"text" is empty')
                yield Record(line=row + 1, id=id_, text=text)
            row += 1


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
        assert self._file is not None
        vectors = np.ascontiguousarray(dense, dtype=ROW_DTYPE)
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
        if self.schema is None:
            id_column = self._ids(ids, None)
            self.schema = pa.schema([("id", id_column.type), ("embedding", embedding.type)])
            self._file.write(self.schema.serialize().to_pybytes())
        elif embedding.type != self.schema.field("embedding").type:
            raise CorpusOutputError(f"a reply has {vectors.shape[1]} dimensions, the file {self.schema}")
        else:
            id_column = self._ids(ids, self.schema.field("id").type)
        batch = pa.record_batch([id_column, embedding], schema=self.schema)
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
