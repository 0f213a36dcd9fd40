"""The built-in all-minilm-l6-v2 (fp32 ONNX built from the safetensors) against a numpy reference.

The expectations come from tests/support/minilm_reference.py, which recomputes
sentence-transformers' output from the original fp32 weights; the server's
graph is the same fp32 model, so it must agree to cosine >= 0.9999 on every input.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support import minilm_reference as ref
from tests.support.texts import LONG_TEXT, SENTENCES

MODEL = "all-minilm-l6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256


def embed(server, inputs: list[str], **fields) -> pb.EmbedResponse:
    return server.stub().Embed(pb.EmbedRequest(inputs=inputs, **fields), timeout=60)


def dense(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.dense.values for e in response.embeddings], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (ref.normalize(a) * ref.normalize(b)).sum(-1)


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="module")
def reference_vectors() -> np.ndarray:
    return ref.embed(SENTENCES)


def test_reference_tokens_cover_the_lengths_we_mean():
    lengths = [len(ref.tokenize(text).ids) for text in SENTENCES]
    assert min(lengths) == 3  # [CLS] hi [SEP]
    assert 180 <= len(ref.tokenize(LONG_TEXT).ids) <= MAX_TOKENS


def test_vectors_match_the_fp32_reference(default_server, reference_vectors):
    vectors = dense(embed(default_server, SENTENCES))
    assert vectors.shape == (len(SENTENCES), DIMENSIONS)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = cosines(vectors, reference_vectors)
    print(f"min cosine vs numpy fp32 reference: {similarity.min():.7f} ({similarity.round(7).tolist()})")
    assert similarity.min() >= 0.9999, similarity
    # Each vector matches its own sentence, not just "some sentence": the
    # reference is discriminative enough for the check above to fail on a mix-up.
    cross = ref.normalize(vectors) @ reference_vectors.T
    assert (cross.argmax(1) == np.arange(len(SENTENCES))).all()


def test_usage_counts_the_reference_tokens(default_server):
    response = embed(default_server, SENTENCES)
    expected = sum(len(ref.tokenize(text).ids) for text in SENTENCES)
    assert response.usage.prompt_tokens == expected
    assert response.usage.total_tokens == expected


def test_paraphrase_scores_above_unrelated(default_server):
    texts = [
        "A man is playing a guitar.",
        "Someone is strumming a guitar.",
        "The central bank raised interest rates by half a point.",
    ]
    v = dense(embed(default_server, texts))
    paraphrase, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    print(f"paraphrase {paraphrase:.4f}, unrelated {unrelated:.4f}")
    assert paraphrase > 0.6
    assert unrelated < 0.2
    assert paraphrase - unrelated > 0.4


def test_over_long_input_is_refused_naming_its_index(default_server):
    long_text = "token " * 300
    assert len(ref.tokenize(long_text).ids) > MAX_TOKENS
    error = error_of(lambda: embed(default_server, ["fine", long_text]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in error.details()
    assert "truncate" in error.details()


def test_truncate_matches_reference_on_first_256_tokens(default_server):
    long_text = " ".join([LONG_TEXT, LONG_TEXT.upper(), "the final words are never seen"])
    full = ref.tokenize(long_text)
    cut = ref.tokenize(long_text, MAX_TOKENS)
    assert len(full.ids) > MAX_TOKENS and len(cut.ids) == MAX_TOKENS
    assert cut.tokens[0] == "[CLS]" and cut.tokens[-1] == "[SEP]"
    response = embed(default_server, [long_text], truncate=True)
    vector = dense(response)[0]
    assert response.usage.prompt_tokens == MAX_TOKENS
    expected = ref.embed([long_text], MAX_TOKENS)[0]
    assert float(vector @ expected) >= 0.9999
    # The check distinguishes a right cut from a wrong one: the first 200
    # tokens only give a visibly different vector.
    other = ref.embed([long_text], 200)[0]
    assert float(vector @ expected) > float(vector @ other)


def test_padding_in_a_batch_does_not_change_a_vector(default_server):
    short = "A short sentence about cats."
    alone = dense(embed(default_server, [short]))[0]
    beside = dense(embed(default_server, [LONG_TEXT, short, "x"]))
    assert float(alone @ beside[1]) >= 0.99999
    assert float(dense(embed(default_server, [LONG_TEXT]))[0] @ beside[0]) >= 0.99999


def test_matryoshka_on_a_model_without_a_list(default_server):
    text = "Matryoshka dolls nest inside one another."
    full = dense(embed(default_server, [text]))[0]
    small = dense(embed(default_server, [text], dimensions=64))[0]
    assert small.shape == (64,)
    assert abs(np.linalg.norm(small) - 1.0) < 1e-5
    # The pooled vector truncated, then normalized (not normalized, truncated).
    expected = ref.normalize(ref.pooled([ref.tokenize(text).ids])[0][:64])
    assert float(small @ expected) >= 0.99
    np.testing.assert_allclose(small, ref.normalize(full[:64]), atol=1e-5)
    assert not np.allclose(small, full[:64], atol=1e-3)

    assert dense(embed(default_server, [text], dimensions=0)).shape == (1, DIMENSIONS)
    same = dense(embed(default_server, [text], dimensions=DIMENSIONS))[0]
    np.testing.assert_allclose(same, full, atol=1e-6)
    error = error_of(lambda: embed(default_server, [text], dimensions=DIMENSIONS + 1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimensions" in error.details()


@pytest.mark.parametrize("dimensions", [0, 64])
def test_binary_is_packed_sign_bits_of_dense(default_server, dimensions):
    texts = ["binary codes", "pack the sign bits"]
    both = pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY
    response = embed(default_server, texts, outputs=both, dimensions=dimensions)
    assert [e.index for e in response.embeddings] == [0, 0, 1, 1]
    size = dimensions or DIMENSIONS
    for i in range(len(texts)):
        d, b = response.embeddings[2 * i], response.embeddings[2 * i + 1]
        assert d.WhichOneof("vector") == "dense" and b.WhichOneof("vector") == "binary"
        values = np.array(d.dense.values, dtype=np.float32)
        assert values.shape == (size,)
        assert b.binary.dimensions == size
        assert b.binary.bits == np.packbits(values > 0).tobytes()
    only_binary = embed(default_server, texts, outputs=[pb.OUTPUT_TYPE_BINARY], dimensions=dimensions)
    assert [e.binary.bits for e in only_binary.embeddings] == [
        response.embeddings[1].binary.bits,
        response.embeddings[3].binary.bits,
    ]


def test_list_models_describes_the_default_model(default_server):
    models = default_server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models
    assert len(models) == 1
    info = models[0]
    assert info.name == MODEL
    assert info.family == "sentence-transformers"
    assert info.dimensions == DIMENSIONS
    assert info.max_tokens == MAX_TOKENS
    assert sorted(info.outputs) == [pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY]
    assert list(info.tasks) == []
    assert list(info.matryoshka_dimensions) == []
    assert info.precision == "fp32"
    assert info.is_default


def test_tokenize_returns_the_reference_tokens(default_server):
    texts = ["Hello, World!", "naïve café 東京"]
    results = default_server.stub().Tokenize(pb.TokenizeRequest(inputs=texts), timeout=10).results
    assert len(results) == len(texts)
    for text, result in zip(texts, results, strict=True):
        expected = ref.tokenize(text)
        assert list(result.ids) == expected.ids
        assert list(result.tokens) == expected.tokens
        assert result.tokens[0] == "[CLS]" and result.tokens[-1] == "[SEP]"
    assert list(results[0].tokens) == ["[CLS]", "hello", ",", "world", "!", "[SEP]"]


def test_response_names_the_resolved_model_and_echoes_request_id(default_server):
    implicit = embed(default_server, ["hi"], request_id="req-42")
    assert implicit.model == MODEL
    assert implicit.request_id == "req-42"
    explicit = embed(default_server, ["hi"], model=MODEL, request_id="req-43")
    assert explicit.model == MODEL and explicit.request_id == "req-43"
    np.testing.assert_allclose(dense(implicit), dense(explicit), atol=1e-6)
    assert embed(default_server, ["hi"]).request_id == ""


def test_tasks_are_accepted_and_ignored(default_server):
    plain = dense(embed(default_server, ["a query"]))
    for task in (pb.TASK_RETRIEVAL_QUERY, pb.TASK_RETRIEVAL_PASSAGE, pb.TASK_TEXT_MATCHING):
        np.testing.assert_allclose(dense(embed(default_server, ["a query"], task=task)), plain, atol=1e-6)
