"""Python client for embedding-service (gRPC); generated stubs in ``embedding_client.proto``.

from embedding_client import EmbeddingClient

with EmbeddingClient("localhost:50051") as client:
    vectors = client.embed(["a text", "another"], task="retrieval.passage").dense  # [2, d] float32
    for item in client.embed_stream(line.strip() for line in open("corpus.txt")):
        ...  # item.dense, in input order, with bounded memory
"""

from .aio import AsyncEmbeddingClient
from .channel import ChannelSettings, RetryPolicy
from .client import EmbeddingClient
from .core import USE_CLIENT_DEFAULT
from .enums import Output, Priority, Task
from .errors import (
    CallCancelledError,
    DeadlineExceededError,
    EmbeddingError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .results import Embedding, Embeddings, ModelInfo, SparseVector, TokenizedInput
from .retry import StreamRetry

__all__ = [
    "USE_CLIENT_DEFAULT",
    "AsyncEmbeddingClient",
    "CallCancelledError",
    "ChannelSettings",
    "DeadlineExceededError",
    "Embedding",
    "EmbeddingClient",
    "EmbeddingError",
    "Embeddings",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "Output",
    "PermissionDeniedError",
    "Priority",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SparseVector",
    "StreamRetry",
    "Task",
    "TokenizedInput",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
