"""bge-m3 through a real server, both ONNX exports: dense, sparse, ColBERT, binary.

``baai``: BAAI's backbone export (``onnx/model.onnx`` + ``model.onnx_data`` +
``Constant_7_attr__value``, outputs ``token_embeddings`` and
``sentence_embedding``) with the heads in ``sparse_linear.pt`` /
``colbert_linear.pt`` (float16, written by real torch:
tests/fixtures/make_bge_m3_heads.py). ``aapot``: a top-level ``model.onnx``
with ``dense_vecs`` / ``sparse_vecs`` / ``colbert_vecs`` and no .pt files.
Expectations come from numpy on the same weights (tests/support/reference.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support.reference import (
    COSINES,
    BgeM3Reference,
    apply_linear,
    assert_binary_matches,
    backbone_states,
)
from tests.support.server import ENGINES_AT_FP32, RunningServer, start_server
from tests.support.synthetic import (
    BGE_M3_HEADS,
    BGE_M3_HIDDEN,
    BgeM3Dir,
    make_bge_m3_aapot,
    make_bge_m3_baai,
)

MODELS = ("baai", "aapot")
DENSE, SPARSE, COLBERT, BINARY = (
    pb.OUTPUT_TYPE_DENSE,
    pb.OUTPUT_TYPE_SPARSE,
    pb.OUTPUT_TYPE_COLBERT,
    pb.OUTPUT_TYPE_BINARY,
)
TEXTS = [
    "the cat and the dog and the bird saw the cat",  # repeated ids: sparse keeps the max
    "cats",
    "What is the capital of France? Paris is the capital.",
    "café",  # <unk> is dropped from sparse
]
LONG_TEXT = " ".join(["the old red house by the river and the green garden"] * 6)  # > 48 tokens


@pytest.fixture(scope="module")
def bge_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BgeM3Dir]:
    root = tmp_path_factory.mktemp("bge-m3")
    return {"baai": make_bge_m3_baai(root / "bge-m3-baai"), "aapot": make_bge_m3_aapot(root / "bge-m3-aapot")}


@pytest.fixture(scope="module")
def refs(bge_dirs: dict[str, BgeM3Dir]) -> dict[str, BgeM3Reference]:
    return {name: BgeM3Reference(model) for name, model in bge_dirs.items()}


@pytest.fixture(scope="module", params=list(ENGINES_AT_FP32))
def server(bge_dirs: dict[str, BgeM3Dir], request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    args = [arg for name, model in bge_dirs.items() for arg in ("--model", f"{name}={model.path}")]
    running = start_server(*args, *ENGINES_AT_FP32[request.param], "--max-batch-wait-ms", "20")
    yield running
    running.stop()


@pytest.fixture(scope="module", autouse=True)
def report_cosines() -> Iterator[None]:
    """Print the smallest cosine seen per output when the module ends (visible with -s)."""
    yield
    print("\nmin cosine:", COSINES.report())


@pytest.fixture(scope="module")
def stub(server: RunningServer):
    return server.stub()


def embed(stub, **fields) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(**fields), timeout=30)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def colbert_rows(embedding: pb.Embedding) -> np.ndarray:
    multi = embedding.colbert
    return np.array(multi.values, np.float64).reshape(-1, multi.dimensions)


def check_embedding(label: str, embedding: pb.Embedding, output: int, ref, dimensions: int = 0) -> None:
    """One Embedding against the reference vectors of its input."""
    kind = {DENSE: "dense", SPARSE: "sparse", COLBERT: "colbert", BINARY: "binary"}[output]
    assert embedding.WhichOneof("vector") == kind
    if output == DENSE:
        assert len(embedding.dense.values) == (dimensions or BGE_M3_HIDDEN)
        np.testing.assert_allclose(np.linalg.norm(embedding.dense.values), 1.0, atol=1e-5)
        COSINES.check(f"bge-m3/{label}/dense", embedding.dense.values, ref.dense)
    elif output == SPARSE:
        COSINES.check_sparse(
            f"bge-m3/{label}/sparse",
            list(embedding.sparse.indices),
            list(embedding.sparse.values),
            ref.sparse,
        )
    elif output == COLBERT:
        rows = colbert_rows(embedding)
        assert rows.shape == ref.colbert.shape
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
        for got, want in zip(rows, ref.colbert, strict=True):
            COSINES.check(f"bge-m3/{label}/colbert", got, want)
    else:
        assert_binary_matches(embedding.binary.bits, embedding.binary.dimensions, ref.dense)


# --- the fixtures themselves -----------------------------------------------------------------


def test_head_fixtures_read_without_torch_equal_the_npy_copies():
    """The server's torch-free reader gives exactly the float16 values torch stored."""
    from embedding_server.models.torch_weights import load_state_dict

    for name in ("sparse_linear", "colbert_linear"):
        state = load_state_dict(BGE_M3_HEADS / f"{name}.pt")
        assert set(state) == {"weight", "bias"}
        for key, array in state.items():
            expected = np.load(BGE_M3_HEADS / f"{name}.{key}.npy")
            assert array.dtype == np.float16
            np.testing.assert_array_equal(array, expected)


def test_synthetic_graphs_match_numpy(bge_dirs, refs):
    ids = refs["baai"].token_ids(TEXTS[2])
    feeds = {"input_ids": np.array([ids]), "attention_mask": np.ones((1, len(ids)), np.int64)}
    baai = ort.InferenceSession(str(bge_dirs["baai"].path / "onnx" / "model.onnx"))
    states, sentence = baai.run(["token_embeddings", "sentence_embedding"], feeds)
    expected = backbone_states(bge_dirs["baai"].weights, ids)
    np.testing.assert_allclose(states[0], expected, atol=1e-5)
    np.testing.assert_allclose(sentence[0], expected[0] / np.linalg.norm(expected[0]), atol=1e-5)

    model = bge_dirs["aapot"]
    aapot = ort.InferenceSession(str(model.path / "model.onnx"))
    _, sparse, colbert = aapot.run(["dense_vecs", "sparse_vecs", "colbert_vecs"], feeds)
    h = backbone_states(model.weights, ids)
    np.testing.assert_allclose(sparse[0, :, 0], np.maximum(apply_linear(h, model.sparse)[:, 0], 0), atol=1e-4)
    np.testing.assert_allclose(colbert[0], apply_linear(h[1:], model.colbert), atol=1e-4)
    assert colbert.shape[1] == len(ids) - 1
    assert (sparse == 0).any() and (sparse > 0).any()  # the relu really cuts


# --- ListModels, Tokenize ------------------------------------------------------------------------


def test_list_models_describes_both_exports(stub, bge_dirs):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == set(MODELS)
    for name, info in models.items():
        assert info.family == "bge-m3"
        assert info.dimensions == BGE_M3_HIDDEN
        assert info.max_tokens == bge_dirs[name].max_tokens
        assert list(info.tasks) == []
        assert list(info.outputs) == [DENSE, SPARSE, COLBERT, BINARY]
        assert list(info.matryoshka_dimensions) == []
    assert models["baai"].is_default
    # baai: tokenizer_config model_max_length 48; aapot: max_position_embeddings 42 - 2
    assert (models["baai"].max_tokens, models["aapot"].max_tokens) == (48, 40)


def test_tokenize_has_no_prefix(stub, refs):
    response = stub.Tokenize(pb.TokenizeRequest(model="aapot", inputs=TEXTS, task=2), timeout=10)
    for text, result in zip(TEXTS, response.results, strict=True):
        expected = refs["aapot"].tokenizer.encode(text)
        assert list(result.ids) == expected.ids
        assert list(result.tokens) == expected.tokens


# --- vectors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(
    "outputs",
    [[DENSE, SPARSE, COLBERT, BINARY], [COLBERT, BINARY, SPARSE, DENSE], [SPARSE], [COLBERT], [BINARY]],
    ids=["all", "all-reversed", "sparse", "colbert", "binary"],
)
def test_outputs_match_reference_in_request_order(stub, refs, model, outputs):
    response = embed(stub, model=model, inputs=TEXTS, outputs=outputs)
    assert response.model == model
    assert len(response.embeddings) == len(TEXTS) * len(outputs)
    for i, text in enumerate(TEXTS):
        expected = refs[model].encode(text)
        for j, output in enumerate(outputs):
            embedding = response.embeddings[i * len(outputs) + j]  # by input, then by outputs
            assert embedding.index == i
            check_embedding(model, embedding, output, expected)
    assert response.usage.prompt_tokens == sum(len(refs[model].token_ids(t)) for t in TEXTS)


def test_sparse_keeps_the_max_per_id_and_drops_specials(stub, refs):
    ref = refs["baai"]
    ids = ref.token_ids(TEXTS[0])
    assert len(set(ids)) < len(ids)  # the text repeats tokens
    response = embed(stub, inputs=[TEXTS[0], TEXTS[3]], outputs=[SPARSE])
    first, second = (e.sparse for e in response.embeddings)
    assert len(set(first.indices)) == len(first.indices)
    assert list(first.indices) == sorted(first.indices)
    assert all(v > 0 for v in first.values)
    assert not {0, 1, 2, 3} & set(first.indices) | set(second.indices)
    assert 3 in ref.token_ids(TEXTS[3])  # "café" has an <unk>, which is not reported
    # some ids of the text got a zero weight and are left out
    assert set(first.indices) < set(ids) - {0, 2}


@pytest.mark.parametrize("model", MODELS)
def test_tasks_are_ignored(stub, model):
    plain = embed(stub, model=model, inputs=TEXTS[:2], outputs=[DENSE, SPARSE])
    for task in (pb.TASK_RETRIEVAL_PASSAGE, pb.TASK_TEXT_MATCHING):
        assert embed(stub, model=model, inputs=TEXTS[:2], outputs=[DENSE, SPARSE], task=task) == plain


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dimensions", [1, 10, 16, BGE_M3_HIDDEN])
def test_dimensions_slice_dense_and_binary_only(stub, refs, model, dimensions):
    outputs = [DENSE, SPARSE, COLBERT, BINARY]
    response = embed(stub, model=model, inputs=TEXTS, outputs=outputs, dimensions=dimensions)
    for i, text in enumerate(TEXTS):
        expected = refs[model].encode(text, dimensions=dimensions)
        dense, sparse, colbert, binary = response.embeddings[4 * i : 4 * i + 4]
        check_embedding(model, dense, DENSE, expected, dimensions)
        check_embedding(model, sparse, SPARSE, expected)
        check_embedding(model, colbert, COLBERT, expected)
        assert colbert.colbert.dimensions == BGE_M3_HIDDEN
        assert binary.binary.dimensions == dimensions
        check_embedding(model, binary, BINARY, expected)


@pytest.mark.parametrize("dimensions", [BGE_M3_HIDDEN + 1, 1024])
def test_dimensions_over_the_width_are_refused(stub, dimensions):
    error = rpc_error(embed, stub, inputs=["cats"], dimensions=dimensions)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimensions" in error.details() and str(BGE_M3_HIDDEN) in error.details()


@pytest.mark.parametrize("model", MODELS)
def test_padding_does_not_change_results(stub, refs, model):
    outputs = [DENSE, SPARSE, COLBERT]
    together = embed(stub, model=model, inputs=TEXTS, outputs=outputs).embeddings
    for i, text in enumerate(TEXTS):
        alone = embed(stub, model=model, inputs=[text], outputs=outputs).embeddings
        np.testing.assert_allclose(together[3 * i].dense.values, alone[0].dense.values, atol=2e-6)
        assert list(together[3 * i + 1].sparse.indices) == list(alone[1].sparse.indices)
        np.testing.assert_allclose(together[3 * i + 1].sparse.values, alone[1].sparse.values, atol=2e-6)
        np.testing.assert_allclose(colbert_rows(together[3 * i + 2]), colbert_rows(alone[2]), atol=2e-6)
        assert colbert_rows(alone[2]).shape[0] == len(refs[model].token_ids(text)) - 1


@pytest.mark.parametrize("model", MODELS)
def test_over_long_input_refused_unless_truncate(stub, refs, bge_dirs, model):
    limit = bge_dirs[model].max_tokens
    assert len(refs[model].token_ids(LONG_TEXT)) > limit
    error = rpc_error(embed, stub, model=model, inputs=["cats", LONG_TEXT])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in error.details() and str(limit) in error.details()

    outputs = [DENSE, SPARSE, COLBERT, BINARY]
    response = embed(stub, model=model, inputs=["cats", LONG_TEXT], outputs=outputs, truncate=True)
    expected = refs[model].encode(LONG_TEXT, max_tokens=limit)
    assert expected.colbert.shape[0] == limit - 1
    for j, output in enumerate(outputs):
        check_embedding(f"{model}-truncated", response.embeddings[4 + j], output, expected)
    assert response.usage.prompt_tokens == len(refs[model].token_ids("cats")) + limit


# --- late chunking --------------------------------------------------------------------------------


def test_late_chunking_on_the_backbone_export(stub, refs):
    chunks = ["The cat sat on the mat.", "It was happy.", "Dogs bark loudly at night"]
    response = embed(stub, model="baai", inputs=chunks, late_chunking=True, outputs=[DENSE, BINARY])
    expected = refs["baai"].late_chunks(chunks)
    assert len(response.embeddings) == 2 * len(chunks)
    for i, want in enumerate(expected):
        dense, binary = response.embeddings[2 * i : 2 * i + 2]
        assert dense.index == binary.index == i
        COSINES.check("bge-m3/baai/late-chunking", dense.dense.values, want)
        assert_binary_matches(binary.binary.bits, binary.binary.dimensions, want)
    sliced = embed(stub, model="baai", inputs=chunks, late_chunking=True, dimensions=8)
    for got, want in zip(sliced.embeddings, refs["baai"].late_chunks(chunks, 8), strict=True):
        COSINES.check("bge-m3/baai/late-chunking", got.dense.values, want)


def test_late_chunking_refusals(stub):
    chunks = ["The cat sat on the mat.", "It was happy."]
    error = rpc_error(embed, stub, model="aapot", inputs=chunks, late_chunking=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # that graph has no token states
    assert "late_chunking" in error.details()
    for output in (SPARSE, COLBERT):
        error = rpc_error(
            embed, stub, model="baai", inputs=chunks, late_chunking=True, outputs=[DENSE, output]
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outputs" in error.details()
    assert embed(stub, model="aapot", inputs=chunks).embeddings  # still serving


def test_heads_are_applied_from_the_pt_files(bge_dirs):
    """The BAAI directory really has the torch files (and the aapot one none)."""
    baai, aapot = Path(bge_dirs["baai"].path), Path(bge_dirs["aapot"].path)
    assert (baai / "sparse_linear.pt").is_file() and (baai / "colbert_linear.pt").is_file()
    assert (baai / "onnx" / "Constant_7_attr__value").is_file()
    assert not list(aapot.glob("*.pt"))
