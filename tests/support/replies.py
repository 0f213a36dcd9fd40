"""Reading a raw EmbedResponse (what the server itself said) as numpy."""

from __future__ import annotations

import numpy as np
from embedding_client.proto import embedding_pb2 as pb


def raw_dense(reply: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.dense.values for e in reply.embeddings], dtype=np.float32)
