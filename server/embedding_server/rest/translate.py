"""JSON ↔ protobuf: a validated REST request to an ``EmbedRequest``, and an ``EmbedResponse`` back.

No model logic: every field maps one to one. Dense floats travel as numpy
float32 arrays so orjson (``OPT_SERIALIZE_NUMPY``) writes them without making
a Python float per value, and base64 is taken straight from the float32 bytes
(little-endian, as the ``openai`` client decodes them).
"""

from __future__ import annotations

import base64
from typing import Any, cast

import numpy as np
from embedding_client.proto import embedding_pb2 as pb

from .errors import bad_request
from .schema import TASKS, EmbeddingsRequest

LITTLE_F32 = np.dtype("<f4")
_DENSE_KIND = {"float": pb.OUTPUT_TYPE_DENSE, "base64": pb.OUTPUT_TYPE_DENSE}


def to_embed_request(
    request: EmbeddingsRequest, auto_truncate: bool = False
) -> tuple[pb.EmbedRequest, list[str]]:
    """The gRPC request, and for each of its ``outputs`` the REST field that asked for it.

    ``auto_truncate``: the operator's default for a body without ``truncate`` (``--auto-truncate``).
    It is applied here because only JSON can tell "absent" from ``false``; gRPC's ``truncate`` has no
    presence, so a gRPC ``false`` is always a request for the error.
    """
    outputs: list[int] = []
    fields: list[str] = []
    if request.return_dense:
        outputs.append(_DENSE_KIND.get(request.embedding_type, pb.OUTPUT_TYPE_BINARY))
        fields.append("embedding_type" if request.embedding_type_given else "return_dense")
    if request.return_sparse:
        outputs.append(pb.OUTPUT_TYPE_SPARSE)
        fields.append("return_sparse")
    if request.return_colbert:
        outputs.append(pb.OUTPUT_TYPE_COLBERT)
        fields.append("return_colbert")
    try:
        message = pb.EmbedRequest(
            model=request.model,
            inputs=request.inputs,
            # protoc's stubs type enum fields as their wrapper class; the values are the same ints
            task=cast(pb.Task, request.task),
            dimensions=request.dimensions,
            late_chunking=request.late_chunking,
            outputs=[cast(pb.OutputType, output) for output in outputs],
            truncate=auto_truncate if request.truncate is None else request.truncate,
            priority=cast(pb.Priority, request.priority),
        )
    except (ValueError, TypeError) as exc:  # e.g. a string protobuf cannot encode as UTF-8
        raise bad_request(f"input: cannot be encoded as UTF-8 text ({exc})", "input") from None
    return message, fields


def _floats(values: Any) -> np.ndarray:
    return np.asarray(values, dtype=LITTLE_F32)


def _dense(embedding: pb.Embedding, embedding_type: str) -> object:
    if embedding_type == "float":
        return _floats(embedding.dense.values)
    if embedding_type == "base64":
        return base64.b64encode(_floats(embedding.dense.values).tobytes()).decode("ascii")
    bits = np.frombuffer(embedding.binary.bits, dtype=np.uint8)
    return bits if embedding_type == "ubinary" else bits.view(np.int8)


def _sparse(embedding: pb.Embedding) -> dict[str, float]:
    vector = embedding.sparse
    return dict(zip(map(str, vector.indices), _floats(vector.values).tolist(), strict=True))


def _colbert(embedding: pb.Embedding) -> np.ndarray:
    vector = embedding.colbert
    return _floats(vector.values).reshape(-1, vector.dimensions or 1)


def to_embeddings_response(response: pb.EmbedResponse, request: EmbeddingsRequest) -> dict[str, object]:
    """OpenAI's list shape; one item per output vector index, fields by requested output."""
    items: dict[int, dict[str, object]] = {}
    for embedding in response.embeddings:
        item = items.get(embedding.index)
        if item is None:
            item = items[embedding.index] = {"object": "embedding", "index": embedding.index}
        kind = embedding.WhichOneof("vector")
        if kind == "dense" or kind == "binary":
            item["embedding"] = _dense(embedding, request.embedding_type)
        elif kind == "sparse":
            item["sparse_embedding"] = _sparse(embedding)
        elif kind == "colbert":
            item["colbert_embedding"] = _colbert(embedding)
    return {
        "object": "list",
        "data": [items[index] for index in sorted(items)],
        "model": response.model,
        "usage": {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.total_tokens},
    }


def to_models_response(response: pb.ListModelsResponse) -> dict[str, object]:
    """OpenAI's model list, with the ModelInfo fields as extensions."""
    tasks = {value: name for name, value in TASKS.items()}
    return {
        "object": "list",
        "data": [
            {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "embedding-server",
                "family": model.family,
                "dimensions": model.dimensions,
                "max_tokens": model.max_tokens,
                "max_document_tokens": model.max_document_tokens,
                "tasks": [tasks[t] for t in model.tasks if t in tasks],
                "outputs": [_output_name(o) for o in model.outputs],
                "matryoshka_dimensions": list(model.matryoshka_dimensions),
                "is_default": model.is_default,
                "engine": model.engine,
                "precision": model.precision,
            }
            for model in response.models
        ],
    }


def _output_name(value: int) -> str:
    try:
        return pb.OutputType.Name(value).removeprefix("OUTPUT_TYPE_").lower()
    except ValueError:  # a kind newer than this shim
        return str(value)
