"""Between protobuf messages and engine types: copies fields, computes nothing (the engine's
results are final, engine/finish.py)."""

from __future__ import annotations

from typing import cast

from embedding_client.proto import embedding_pb2 as pb

from ..engine.jobs import EmbedJob, EmbedResult, TokenizedResult
from ..models.types import ModelDescription, Output, Priority, SequenceVectors


def to_job(
    request: pb.EmbedRequest,
    deadline: float | None,
    unspecified: Priority = Priority.INTERACTIVE,
    flow: object = None,
) -> EmbedJob:
    """``unspecified``: the class of PRIORITY_UNSPECIFIED (interactive for Embed, batch for StreamEmbed);
    a value newer than this server counts as interactive."""
    priority = Priority(request.priority) if request.priority in (1, 2) else Priority.INTERACTIVE
    return EmbedJob(
        inputs=list(request.inputs),
        model=request.model,
        task=int(request.task),
        dimensions=int(request.dimensions),
        late_chunking=request.late_chunking,
        outputs=[int(o) for o in request.outputs],
        truncate=request.truncate,
        deadline=deadline,
        priority=unspecified if request.priority == pb.PRIORITY_UNSPECIFIED else priority,
        flow=flow,
    )


def to_response(request_id: str, result: EmbedResult) -> pb.EmbedResponse:
    embeddings = [
        _embedding(index, output, vectors)
        for index, vectors in enumerate(result.vectors)
        for output in result.outputs
    ]
    usage = pb.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return pb.EmbedResponse(request_id=request_id, model=result.model, embeddings=embeddings, usage=usage)


def _embedding(index: int, output: Output, vectors: SequenceVectors) -> pb.Embedding:
    # the finish step (engine/finish.py) filled every output the request asked for, final
    if output == Output.DENSE:
        assert vectors.dense is not None
        return pb.Embedding(index=index, dense=pb.DenseVector(values=vectors.dense[0].tolist()))
    if output == Output.BINARY:
        binary = vectors.binary
        assert binary is not None
        bits = binary.bits[0].tobytes()
        return pb.Embedding(index=index, binary=pb.BinaryVector(bits=bits, dimensions=binary.dimensions))
    if output == Output.SPARSE:
        sparse = vectors.sparse
        assert sparse is not None
        return pb.Embedding(
            index=index,
            sparse=pb.SparseVector(indices=sparse.ids.tolist(), values=sparse.weights.tolist()),
        )
    colbert = vectors.colbert
    assert colbert is not None
    return pb.Embedding(
        index=index,
        colbert=pb.MultiVector(dimensions=int(colbert.shape[1]), values=colbert.ravel().tolist()),
    )


def model_info(description: ModelDescription, is_default: bool) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=description.name,
        family=description.family,
        dimensions=description.dimensions,
        max_tokens=description.max_tokens,
        # protoc's stubs type enum fields as their wrapper class; the values are the same ints
        tasks=[cast(pb.Task, int(t)) for t in description.tasks],
        outputs=[cast(pb.OutputType, int(o)) for o in description.outputs],
        matryoshka_dimensions=list(description.matryoshka_dimensions),
        is_default=is_default,
        max_document_tokens=description.max_document_tokens,
        precision=description.precision,
        engine=description.engine,
    )


def tokenized(results: list[TokenizedResult]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(results=[pb.TokenizedInput(ids=r.ids, tokens=r.tokens) for r in results])
