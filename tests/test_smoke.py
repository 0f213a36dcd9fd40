"""The default model answers Embed through a real server process."""

import numpy as np
from embedding_client.proto import embedding_pb2 as pb


def test_default_model_embeds_unit_vectors(default_server):
    response = default_server.stub().Embed(pb.EmbedRequest(inputs=["hello world", "a cat"]), timeout=30)
    assert response.model == "all-minilm-l6-v2"
    vectors = np.array([e.dense.values for e in response.embeddings])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.usage.prompt_tokens == 4 + 4  # [CLS] hello world [SEP], [CLS] a cat [SEP]
