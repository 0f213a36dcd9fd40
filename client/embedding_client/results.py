"""Responses as numpy: what the client hands back instead of protobuf messages.

Dense vectors of a request form one ``[n, d]`` float32 array, binary codes one
``[n, ceil(d/8)]`` uint8 array (rows as the server packed them, MSB first);
sparse and ColBERT outputs differ in length per input, so they are lists.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .enums import Output, Task
from .errors import EmbeddingError, InternalError
from .proto import embedding_pb2 as pb


@dataclass(frozen=True, eq=False)  # our __eq__ compares the arrays; defining it leaves it unhashable
class SparseVector:
    """Lexical weights of one input: token ``ids`` (ascending, uint32) and their ``weights``."""

    ids: np.ndarray
    weights: np.ndarray

    def to_dict(self) -> dict[int, float]:
        return dict(zip(self.ids.tolist(), self.weights.tolist(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SparseVector):
            return NotImplemented
        return np.array_equal(self.ids, other.ids) and np.array_equal(self.weights, other.weights)


@dataclass(frozen=True)
class Embedding:
    """The outputs of one input; those not asked for are None."""

    index: int
    dense: np.ndarray | None = None
    sparse: SparseVector | None = None
    colbert: np.ndarray | None = None
    binary: np.ndarray | None = None


@dataclass
class Embeddings:
    """The outputs of consecutive inputs (one call, or one StreamEmbed request).

    ``offset`` is the position of the first input in the whole call or stream.
    ``error`` is set only by ``embed_stream_batches(on_error="yield")``: the
    request failed and carries no vectors. ``request_ids`` are the server's ids
    of the unary calls that made it (its ``x-request-id`` trailer, as in its
    logs); ``request_id`` is the first of them.
    """

    model: str = ""
    count: int = 0
    dense: np.ndarray | None = None
    sparse: list[SparseVector] | None = None
    colbert: list[np.ndarray] | None = None
    binary: np.ndarray | None = None
    prompt_tokens: int = 0
    offset: int = 0
    error: EmbeddingError | None = None
    request_ids: tuple[str, ...] = ()

    @property
    def request_id(self) -> str | None:
        return self.request_ids[0] if self.request_ids else None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> Embedding:
        if not -self.count <= i < self.count:
            raise IndexError(i)
        i %= self.count
        return Embedding(
            index=self.offset + i,
            dense=None if self.dense is None else self.dense[i],
            sparse=None if self.sparse is None else self.sparse[i],
            colbert=None if self.colbert is None else self.colbert[i],
            binary=None if self.binary is None else self.binary[i],
        )

    def __iter__(self) -> Iterator[Embedding]:
        for i in range(self.count):
            yield self[i]

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: object = None) -> np.ndarray:
        """``np.asarray(result)`` is the dense matrix."""
        if self.dense is None:
            raise ValueError("no dense vectors in this result (outputs did not include dense)")
        return self.dense if dtype is None else self.dense.astype(dtype)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    dimensions: int
    max_tokens: int
    tasks: tuple[Task, ...]
    outputs: tuple[Output, ...]
    matryoshka_dimensions: tuple[int, ...]
    is_default: bool
    max_document_tokens: int = 0  # longest late-chunked document (tokens); 0: cannot late-chunk
    precision: str = ""  # what it runs at: "fp32", "bf16", "int8" (empty: an older server)
    engine: str = ""  # what runs it: "onnxruntime", "openvino" (empty: an older server)


@dataclass(frozen=True)
class TokenizedInput:
    ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)


def decode_embeddings(
    response: pb.EmbedResponse, count: int, outputs: Sequence[Output], offset: int = 0
) -> Embeddings:
    """numpy arrays from a response; checks that every input got every output it asked for."""
    result = Embeddings(
        model=response.model, count=count, prompt_tokens=response.usage.prompt_tokens, offset=offset
    )
    items = response.embeddings
    if len(items) != count * len(outputs) or (count and items[-1].index != count - 1):
        raise InternalError(
            f"malformed response: {len(items)} embeddings for {count} inputs x {len(outputs)} outputs"
        )
    stride = len(outputs)
    for slot, output in enumerate(outputs):
        chosen = items[slot::stride]  # the server orders by input, then by the request's outputs
        if output == Output.DENSE:
            result.dense = _dense_matrix(chosen)
        elif output == Output.BINARY:
            result.binary = _binary_matrix(chosen)
        elif output == Output.SPARSE:
            result.sparse = [
                SparseVector(
                    np.array(e.sparse.indices, dtype=np.uint32), np.array(e.sparse.values, dtype=np.float32)
                )
                for e in chosen
            ]
        else:
            result.colbert = [
                np.array(e.colbert.values, dtype=np.float32).reshape(-1, e.colbert.dimensions or 1)
                for e in chosen
            ]
    return result


def _dense_matrix(items: Sequence[pb.Embedding]) -> np.ndarray:
    if not items:
        return np.zeros((0, 0), dtype=np.float32)
    width = len(items[0].dense.values)
    matrix = np.empty((len(items), width), dtype=np.float32)
    for row, item in enumerate(items):
        matrix[row] = item.dense.values
    return matrix


def _binary_matrix(items: Sequence[pb.Embedding]) -> np.ndarray:
    if not items:
        return np.zeros((0, 0), dtype=np.uint8)
    return np.frombuffer(b"".join(item.binary.bits for item in items), dtype=np.uint8).reshape(len(items), -1)


def concatenate(parts: Sequence[Embeddings]) -> Embeddings:
    """One result from consecutive parts (a long list sent as several requests)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return Embeddings(
        model=first.model,
        count=sum(p.count for p in parts),
        dense=None if first.dense is None else np.concatenate([p.dense for p in parts]),
        sparse=None if first.sparse is None else [v for p in parts for v in p.sparse or ()],
        colbert=None if first.colbert is None else [v for p in parts for v in p.colbert or ()],
        binary=None if first.binary is None else np.concatenate([p.binary for p in parts]),
        prompt_tokens=sum(p.prompt_tokens for p in parts),
        offset=first.offset,
        request_ids=tuple(i for p in parts for i in p.request_ids),
    )


def decode_model(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=info.name,
        family=info.family,
        dimensions=info.dimensions,
        max_tokens=info.max_tokens,
        tasks=tuple(Task(t) for t in info.tasks if t in Task._value2member_map_),
        outputs=tuple(Output(o) for o in info.outputs if o in Output._value2member_map_),
        matryoshka_dimensions=tuple(info.matryoshka_dimensions),
        is_default=info.is_default,
        max_document_tokens=info.max_document_tokens,
        precision=info.precision,
        engine=info.engine,
    )


def decode_tokenized(response: pb.TokenizeResponse) -> list[TokenizedInput]:
    return [TokenizedInput(ids=list(r.ids), tokens=list(r.tokens)) for r in response.results]
