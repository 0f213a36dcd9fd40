"""A reply written as wire bytes by hand (grpc_api/convert.py ``encoded_response``) is the reply protobuf
would write: the expected bytes come from a message built here, field by field, and protobuf's own
serializer; the decoded vectors are the arrays the engine gave, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.engine.jobs import EmbedResult
from embedding_server.grpc_api.convert import encoded_response
from embedding_server.models.types import Output, PackedBits, SequenceVectors, SparseWeights

ALL = (Output.DENSE, Output.SPARSE, Output.COLBERT, Output.BINARY)


def vectors(rng: np.random.Generator, count: int, dimensions: int) -> list[SequenceVectors]:
    out = []
    for i in range(count):
        dense = rng.standard_normal((1, dimensions)).astype(np.float32)
        dense[0, 0] = -0.0 if i % 2 else 1e-40  # a signed zero and a subnormal survive the bytes
        entries = i % 4  # 0: an all-zero sparse vector, which is still a vector
        sparse = SparseWeights(
            np.sort(rng.choice(250_000, entries, replace=False)).astype(np.uint32),
            rng.random(entries, dtype=np.float32),
        )
        colbert = rng.standard_normal((1 + i % 3, dimensions)).astype(np.float32)
        bits = PackedBits(np.packbits(dense > 0, axis=1), dimensions)
        out.append(SequenceVectors(dense=dense, sparse=sparse, colbert=colbert, binary=bits))
    return out


def expected_message(request_id: str, result: EmbedResult) -> pb.EmbedResponse:
    reply = pb.EmbedResponse(request_id=request_id, model=result.model)
    for index, v in enumerate(result.vectors):
        for output in result.outputs:
            embedding = reply.embeddings.add(index=index)
            if output == Output.DENSE:
                assert v.dense is not None
                embedding.dense.values.extend(float(x) for x in v.dense[0])
                embedding.dense.SetInParent()
            elif output == Output.SPARSE:
                assert v.sparse is not None
                embedding.sparse.SetInParent()
                embedding.sparse.indices.extend(int(x) for x in v.sparse.ids)
                embedding.sparse.values.extend(float(x) for x in v.sparse.weights)
            elif output == Output.COLBERT:
                assert v.colbert is not None
                embedding.colbert.dimensions = v.colbert.shape[1]
                embedding.colbert.values.extend(float(x) for x in v.colbert.ravel())
            else:
                assert v.binary is not None
                embedding.binary.bits = bytes(v.binary.bits[0])
                embedding.binary.dimensions = v.binary.dimensions
    reply.usage.prompt_tokens = reply.usage.total_tokens = result.prompt_tokens
    return reply


@pytest.mark.parametrize(
    ("count", "dimensions", "outputs", "tokens"),
    [
        (1, 24, (Output.DENSE,), 0),  # index 0 and zero tokens: the fields proto3 leaves out
        (8, 1024, (Output.DENSE,), 97),
        (300, 384, (Output.DENSE,), 40),  # dense alone (each Embedding's head built once) past index 127
        (200, 7, ALL, 300_000),  # indices past 127 and token counts past 2^14: varints of 2-3 bytes
        (3, 16, (Output.BINARY, Output.DENSE), 5),  # the request's output order, per input
    ],
)
def test_the_bytes_are_protobufs_own(count: int, dimensions: int, outputs: tuple[Output, ...], tokens: int):
    rng = np.random.default_rng(count)
    result = EmbedResult("bge-m3", outputs, vectors(rng, count, dimensions), tokens)
    written = encoded_response("req-ü", result)
    assert written == expected_message("req-ü", result).SerializeToString()
    decoded = pb.EmbedResponse.FromString(written)
    assert len(decoded.embeddings) == count * len(outputs)
    for k, embedding in enumerate(decoded.embeddings):
        source = result.vectors[k // len(outputs)]
        assert embedding.index == k // len(outputs)
        assert embedding.WhichOneof("vector") == outputs[k % len(outputs)].name.lower()
        if embedding.HasField("dense"):
            assert source.dense is not None
            got = np.asarray(embedding.dense.values, dtype=np.float32)
            assert got.tobytes() == source.dense[0].tobytes()  # bit for bit, -0.0 included
    assert decoded.usage.prompt_tokens == decoded.usage.total_tokens == tokens


def test_an_empty_dense_vector_is_still_set():
    result = EmbedResult("m", (Output.DENSE,), [SequenceVectors(dense=np.zeros((1, 0), np.float32))], 1)
    written = encoded_response("", result)
    assert written == expected_message("", result).SerializeToString()
    decoded = pb.EmbedResponse.FromString(written)
    assert decoded.embeddings[0].HasField("dense") and len(decoded.embeddings[0].dense.values) == 0
