"""Ray Data: embed a column of texts with ``Dataset.map_batches``, over a fleet of servers or in-process.

    import ray
    from embedding_client.ray import EmbedBatches

    ds = ray.data.read_parquet("docs.parquet")  # columns id, text
    ds = ds.map_batches(
        EmbedBatches,
        fn_constructor_kwargs={"target": "dns:///embedding-grpc:50051"},  # or engine_args=[...]
        batch_format="pyarrow", batch_size=1024, concurrency=4, num_cpus=0.25,
    )
    ds.write_parquet("vectors/")  # id, text, embedding (fixed_size_list<float32>[d])

Two modes, the same vectors:

- **service** (``target=...``): each actor streams its batches to the servers
  through :class:`EmbeddingClient.embed_stream_batches`, as the corpus CLI
  does: round robin over the replicas, length-sorted requests, broken streams
  re-established with only the unanswered requests re-sent, and every request
  marked ``PRIORITY_BATCH`` so the servers put interactive traffic first.
- **in-process** (``engine_args=[...]``): each actor loads the models with the
  server's own engine, from the same ``embedding-server`` flags (``--model``,
  ``--max-batch-tokens``, ``--memory-limit``, ...), built as the server builds
  it, and runs the same request path minus the wire
  (``embedding_server.in_process``, found through the ``embedding_client.engines``
  entry point). For clusters without a serving fleet. Needs the
  ``embedding-server`` distribution on the workers.

Every column of the input batch is kept, rows stay in place (set
``DataContext.execution_options.preserve_order`` for a dataset-wide order), and
the outputs become Arrow columns: dense ``embedding`` as
``fixed_size_list<float32>[d]``, ``embedding_binary`` as
``fixed_size_list<uint8>[d/8]``, ``embedding_sparse`` as
``struct<ids: list<uint32>, weights: list<float32>>``, ``embedding_colbert`` as
``list<fixed_size_list<float32>[d]>``. With ``chunks_column`` (late chunking)
each row is one document, a list of chunks, and each output holds one value
per chunk (a list of them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np
import pyarrow as pa

from .channel import ChannelSettings, count_addresses
from .client import DEFAULT_WINDOW, EmbeddingClient
from .corpus_parquet import fixed_rows
from .enums import Output, OutputLike, PriorityLike, TaskLike
from .requests import DEFAULT_BATCH_SIZE, EmbedOptions
from .results import Embeddings, concatenate
from .retry import StreamRetry

#: Streams per actor for a target whose replicas a resolver finds (as the corpus CLI).
RESOLVER_STREAMS = 4
#: In-process engines use one session per CPU the actor was given, up to this many.
MAX_IN_PROCESS_SESSIONS = 4

if TYPE_CHECKING:  # pyarrow has no type information: to mypy the union is Any
    Batch: TypeAlias = Any
else:  # what map_batches hands over: Arrow, numpy dict or pandas (Ray reads the annotation)
    Batch = pa.Table | dict[str, Any] | Any


class EmbedBatches:
    """A callable class for ``Dataset.map_batches``: adds the embedding columns to each batch.

    Give exactly one of ``target`` (service mode: a gRPC target, as for
    :class:`EmbeddingClient`) or ``engine_args`` (in-process mode: the
    ``embedding-server`` flags that pick and tune the models, e.g.
    ``["--model", "jina-v3=/models/jina-embeddings-v3"]``; ``[]`` is the
    built-in model). The options mirror ``embedding-client corpus``;
    ``settings`` holds the connection's TLS and API key
    (``ChannelSettings(tls=True, api_key=...)``).
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        engine_args: Sequence[str] | None = None,
        text_column: str = "text",
        chunks_column: str | None = None,
        output_column: str = "embedding",
        model: str = "",
        task: TaskLike = None,
        dimensions: int | None = None,
        outputs: OutputLike | Iterable[OutputLike] | None = None,
        truncate: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
        window: int = DEFAULT_WINDOW,
        streams: int | None = None,
        length_sort: bool = True,
        priority: PriorityLike = "batch",
        retry_timeout: float = 300.0,
        settings: ChannelSettings | None = None,
    ) -> None:
        if (target is None) == (engine_args is None):
            raise ValueError("EmbedBatches: give either target (service mode) or engine_args (in-process)")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.options = EmbedOptions.build(
            model,
            task,
            dimensions,
            outputs,
            late_chunking=chunks_column is not None,
            truncate=truncate,
            priority=priority,
        )
        self.text_column = text_column
        self.chunks_column = chunks_column
        self.output_column = output_column
        self.batch_size = batch_size
        self.backend: Backend
        if target is not None:
            self.backend = ServiceBackend(
                target,
                settings or ChannelSettings(),
                window=window,
                streams=streams or count_addresses(target) or RESOLVER_STREAMS,
                length_sort=length_sort and chunks_column is None,
                retry=StreamRetry(timeout=retry_timeout),
            )
        else:
            self.backend = in_process_engine([*default_engine_args(), *(engine_args or [])])

    def __call__(self, batch: Batch) -> pa.Table:
        table = as_table(batch)
        if table.num_rows == 0:
            return table  # nothing to embed (and the width of the vectors is unknown without a reply)
        if self.chunks_column is not None:
            documents = column_values(table, self.chunks_column, list)
            for index, chunks in enumerate(documents):
                if not chunks or not all(isinstance(chunk, str) and chunk for chunk in chunks):
                    raise ValueError(
                        f"{self.chunks_column}: row {index} of this batch needs a non-empty list of "
                        "non-empty strings"
                    )
            results = list(self.backend.run(self.options, documents, self.batch_size))
            columns = document_columns(results, self.options.outputs)
        else:
            texts = column_values(table, self.text_column, str)
            result = concatenate(list(self.backend.run(self.options, texts, self.batch_size)))
            if result.count != len(texts):
                raise RuntimeError(f"{result.count} vectors for {len(texts)} texts")
            columns = text_columns(result, self.options.outputs)
        for output, array in columns.items():
            table = table.append_column(column_name(self.output_column, output), array)
        return table

    def close(self) -> None:
        """Release the channel or the engine (Ray ends actors without it; tests and scripts call it)."""
        self.backend.close()


# --- the two backends ------------------------------------------------------------------------


class ServiceBackend:
    """A client per actor; each batch is one resumable StreamEmbed run over the replicas."""

    def __init__(
        self,
        target: str,
        settings: ChannelSettings,
        *,
        window: int,
        streams: int,
        length_sort: bool,
        retry: StreamRetry,
    ) -> None:
        self.client = EmbeddingClient(target, settings=settings, stream_retry=retry)
        self.window = window
        self.streams = streams
        self.length_sort = length_sort

    def run(self, options: EmbedOptions, items: list[Any], batch_size: int) -> Iterator[Embeddings]:
        run = self.client.embed_stream_batches(
            items,
            model=options.model or None,
            task=options.task,
            dimensions=options.dimensions or None,
            outputs=options.outputs,
            late_chunking=options.late_chunking,
            truncate=options.truncate,
            priority=options.priority,
            batch_size=batch_size,
            window=self.window,
            streams=self.streams,
            length_sort=len(items) if self.length_sort and items else None,
        )
        with run:
            yield from run

    def close(self) -> None:
        self.client.close()


class Backend(Protocol):
    """What a mode runs a batch with: one result per request (``batch_size`` texts, or one document)."""

    def run(self, options: EmbedOptions, items: list[Any], batch_size: int) -> Iterator[Embeddings]: ...

    def close(self) -> None: ...


#: The entry point group where the embedding-server distribution offers its in-process engine.
ENGINES_GROUP = "embedding_client.engines"


def in_process_engine(engine_args: list[str]) -> Backend:
    """The server's engine in this process, found by its entry point (the client never imports the
    server: it installs and runs without it)."""
    found = entry_points(group=ENGINES_GROUP, name="in_process")
    if not found:
        raise RuntimeError(
            "EmbedBatches(engine_args=...): in-process mode needs the embedding-server distribution "
            "on every worker (pip install embedding-server)"
        )
    engine: Backend = next(iter(found)).load()(engine_args)
    return engine


def default_engine_args() -> list[str]:
    """One single-threaded session per CPU Ray gave this actor (the server would count the node's)."""
    import ray

    cpus = 1
    if ray.is_initialized():  # (get_runtime_context() would start a local Ray outside one)
        try:
            resources = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
            cpus = int(resources.get("CPU", 1) or 1)
        except AssertionError:  # Ray's answer in the driver, which is given no resources
            cpus = 1
    sessions = max(1, min(cpus, MAX_IN_PROCESS_SESSIONS))
    return ["--sessions", str(sessions), "--threads-per-session", "1"]


# --- Arrow in and out ------------------------------------------------------------------------


def as_table(batch: Batch) -> pa.Table:
    """Any batch format map_batches uses, as an Arrow table (columns unchanged)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table(
            {
                name: pa.array(list(values))
                if getattr(values, "dtype", np.dtype(int)).kind == "O"
                else values
                for name, values in batch.items()
            }
        )
    if type(batch).__name__ == "DataFrame":
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise TypeError(f"expected a pyarrow Table, a dict of numpy arrays or a DataFrame, got {type(batch)}")


def column_values(table: pa.Table, name: str, kind: type) -> list[Any]:
    if name not in table.column_names:
        raise KeyError(f"{name}: no such column (columns: {', '.join(table.column_names)})")
    values: list[Any] = table.column(name).to_pylist()
    for index, value in enumerate(values):
        if not isinstance(value, kind) or (kind is str and not value):
            found = "null" if value is None else repr(value)[:40]
            raise ValueError(
                f"{name}: row {index} of this batch is {found}; expected a non-empty {kind.__name__}"
            )
    return values


def column_name(prefix: str, output: Output) -> str:
    return prefix if output == Output.DENSE else f"{prefix}_{output.name.lower()}"


def nested(values: pa.Array, counts: Sequence[int]) -> pa.ListArray:
    """``values`` cut into consecutive lists of ``counts`` items."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def text_columns(result: Embeddings, outputs: Sequence[Output]) -> dict[Output, pa.Array]:
    """One value per text, per output."""
    columns: dict[Output, pa.Array] = {}
    for output in outputs:
        if output == Output.DENSE:
            # an output asked for is in every result (results.py)
            columns[output] = fixed_rows(result.dense, np.float32)  # type: ignore[arg-type]
        elif output == Output.BINARY:
            # an output asked for is in every result (results.py)
            columns[output] = fixed_rows(result.binary, np.uint8)  # type: ignore[arg-type]
        elif output == Output.SPARSE:
            sparse = result.sparse or []
            counts = [len(vector.ids) for vector in sparse]
            ids = pa.array(np.concatenate([v.ids for v in sparse] or [np.zeros(0, np.uint32)]))
            weights = pa.array(np.concatenate([v.weights for v in sparse] or [np.zeros(0, np.float32)]))
            columns[output] = pa.StructArray.from_arrays(
                [nested(ids, counts), nested(weights, counts)], names=["ids", "weights"]
            )
        else:
            colbert = result.colbert or []
            stacked = np.concatenate(colbert) if colbert else np.zeros((0, 0), np.float32)
            columns[output] = nested(fixed_rows(stacked, np.float32), [len(m) for m in colbert])
    return columns


def document_columns(results: list[Embeddings], outputs: Sequence[Output]) -> dict[Output, pa.Array]:
    """Late chunking: one list per document (a value per chunk), per output."""
    counts = [result.count for result in results]
    merged = text_columns(concatenate(results), outputs) if results else {}
    return {output: nested(array, counts) for output, array in merged.items()}
