"""jina-v3 through a real server: every task, Matryoshka, late chunking, binary, truncation.

Two synthetic jina-v3 directories are served side by side: the official
export's shape (``task_id`` rank 0, float32 ``text_embeds``) and a variant
(``task_id`` of shape [1], float16 ``text_embeds`` listed after another
output). Every vector is compared with the numpy reference computed from the
same weights (tests/support/reference.py), cosine >= 0.9999.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support.reference import COSINES, JinaV3Reference, assert_binary_matches, backbone_states
from tests.support.server import ENGINES_AT_FP32, RunningServer, start_server
from tests.support.synthetic import (
    JINA_HIDDEN,
    JINA_MATRYOSHKA,
    JINA_MAX_TOKENS,
    PAD_ID,
    JinaV3Dir,
    make_jina_v3,
)

MODELS = ("jina", "jina-rank1")
TASKS = (
    pb.TASK_UNSPECIFIED,
    pb.TASK_RETRIEVAL_QUERY,
    pb.TASK_RETRIEVAL_PASSAGE,
    pb.TASK_SEPARATION,
    pb.TASK_CLASSIFICATION,
    pb.TASK_TEXT_MATCHING,
)
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "cats",
    "Where is the capital of France? It is Paris, a city on a river.",
    "café au lait",  # characters outside the vocabulary: <unk>
]
CHUNKS = [
    "The cat sat on the mat.",
    "It was happy there in the evening sun.",
    "Dogs bark loudly at night",
]
LONG_TEXT = " ".join(["the old red house by the river and the green garden"] * 8)  # > 64 tokens


@pytest.fixture(scope="module")
def jina_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, JinaV3Dir]:
    root = tmp_path_factory.mktemp("jina-v3")
    return {
        "jina": make_jina_v3(root / "jina-v3-tiny", seed=3),
        "jina-rank1": make_jina_v3(
            root / "jina-v3-rank1", task_id_rank=1, float16_output=True, extra_output=True, seed=4
        ),
    }


@pytest.fixture(scope="module")
def refs(jina_dirs: dict[str, JinaV3Dir]) -> dict[str, JinaV3Reference]:
    return {name: JinaV3Reference(model) for name, model in jina_dirs.items()}


@pytest.fixture(scope="module", params=list(ENGINES_AT_FP32))
def server(jina_dirs: dict[str, JinaV3Dir], request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    args = [arg for name, model in jina_dirs.items() for arg in ("--model", f"{name}={model.path}")]
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


def dense_rows(response: pb.EmbedResponse) -> list[np.ndarray]:
    return [np.array(e.dense.values, np.float64) for e in response.embeddings]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- the synthetic graph itself -----------------------------------------------------------


def test_synthetic_graph_matches_numpy_and_depends_on_pad_id(jina_dirs, refs):
    """The fixture has teeth: ORT equals the numpy reference, and padding with 0 changes numbers."""
    model = jina_dirs["jina"]
    session = ort.InferenceSession(str(model.path / "onnx" / "model.onnx"))
    short, long = refs["jina"].token_ids("cats", 2), refs["jina"].token_ids(TEXTS[0], 2)

    def run(pad_id: int) -> np.ndarray:
        ids = np.full((2, len(long)), pad_id, np.int64)
        mask = np.zeros_like(ids)
        for row, seq in enumerate((short, long)):
            ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
        return session.run(
            ["text_embeds"], {"input_ids": ids, "attention_mask": mask, "task_id": np.array(1)}
        )[0]

    right = run(PAD_ID)
    expected = backbone_states(model.weights, short, 1)
    np.testing.assert_allclose(right[0, : len(short)], expected, atol=1e-5)
    np.testing.assert_allclose(right[1], backbone_states(model.weights, long, 1), atol=1e-5)
    wrong = run(0)
    assert np.abs(wrong[0, : len(short)] - expected).max() > 1e-2
    # the task matters too
    other_task = backbone_states(model.weights, short, 3)
    assert np.abs(other_task - expected).max() > 1e-2


# --- ListModels, Tokenize --------------------------------------------------------------------


def test_list_models_describes_both_exports(stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == set(MODELS)
    assert models["jina"].is_default and not models["jina-rank1"].is_default
    for info in models.values():
        assert info.family == "jina-v3"
        assert info.dimensions == JINA_HIDDEN
        assert info.max_tokens == JINA_MAX_TOKENS
        assert list(info.tasks) == [1, 2, 3, 4, 5]
        assert list(info.outputs) == [pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY]
        assert list(info.matryoshka_dimensions) == list(JINA_MATRYOSHKA)


@pytest.mark.parametrize("task", [pb.TASK_UNSPECIFIED, pb.TASK_RETRIEVAL_PASSAGE, pb.TASK_SEPARATION])
def test_tokenize_returns_prefix_and_special_tokens(stub, refs, task):
    response = stub.Tokenize(pb.TokenizeRequest(model="jina", inputs=TEXTS, task=task), timeout=10)
    assert len(response.results) == len(TEXTS)
    for text, result in zip(TEXTS, response.results, strict=True):
        expected = refs["jina"].tokenizer.encode(refs["jina"].prefix(task) + text)
        assert list(result.ids) == expected.ids
        assert list(result.tokens) == expected.tokens
        assert result.ids[0] == 0 and result.ids[-1] == 2
    if task != pb.TASK_SEPARATION:
        assert "▁Represent" in response.results[0].tokens
    assert 3 in response.results[3].ids  # <unk> for the accented character


def test_tokenize_is_not_cut_by_the_files_truncation(stub, refs):
    (result,) = stub.Tokenize(pb.TokenizeRequest(model="jina", inputs=[LONG_TEXT]), timeout=10).results
    assert list(result.ids) == refs["jina"].token_ids(LONG_TEXT, pb.TASK_RETRIEVAL_QUERY)
    assert len(result.ids) > JINA_MAX_TOKENS


# --- dense vectors -------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", TASKS)
def test_every_task_matches_reference(stub, refs, model, task):
    response = embed(stub, model=model, inputs=TEXTS, task=task)
    assert response.model == model
    assert [e.index for e in response.embeddings] == list(range(len(TEXTS)))
    for text, row in zip(TEXTS, dense_rows(response), strict=True):
        assert row.shape == (JINA_HIDDEN,)
        np.testing.assert_allclose(np.linalg.norm(row), 1.0, atol=1e-5)
        COSINES.check(f"jina-v3/{model}/dense", row, refs[model].dense(text, task))
    expected_tokens = sum(len(refs[model].token_ids(t, task)) for t in TEXTS)
    assert response.usage.prompt_tokens == expected_tokens
    assert response.usage.total_tokens == expected_tokens


def test_tasks_give_different_vectors(stub, refs):
    """TASK_UNSPECIFIED is retrieval.query; the other adapters really differ."""
    vectors = {task: dense_rows(embed(stub, inputs=TEXTS[:1], task=task))[0] for task in TASKS}
    np.testing.assert_allclose(vectors[pb.TASK_UNSPECIFIED], vectors[pb.TASK_RETRIEVAL_QUERY], atol=1e-6)
    distinct = [vectors[t] for t in TASKS[1:]]
    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            assert float(distinct[i] @ distinct[j]) < 0.999, (TASKS[i + 1], TASKS[j + 1])


def test_default_model_is_the_first(stub, refs):
    response = embed(stub, inputs=["cats"])
    assert response.model == "jina"
    COSINES.check("jina-v3/jina/dense", dense_rows(response)[0], refs["jina"].dense("cats"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dimensions", [0, *JINA_MATRYOSHKA])
def test_matryoshka_dimensions(stub, refs, model, dimensions):
    task = pb.TASK_CLASSIFICATION
    response = embed(stub, model=model, inputs=TEXTS, task=task, dimensions=dimensions)
    for text, row in zip(TEXTS, dense_rows(response), strict=True):
        assert row.shape == (dimensions or JINA_HIDDEN,)
        np.testing.assert_allclose(np.linalg.norm(row), 1.0, atol=1e-5)  # truncated, then normalized
        COSINES.check(f"jina-v3/{model}/matryoshka", row, refs[model].dense(text, task, dimensions))


@pytest.mark.parametrize("dimensions", [4, 12, 24, 33, 64])
def test_other_dimensions_are_refused_with_the_allowed_list(stub, dimensions):
    error = rpc_error(embed, stub, inputs=["cats"], dimensions=dimensions)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimensions" in error.details()
    assert str(list(JINA_MATRYOSHKA)) in error.details()


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dimensions", [0, 8, 16])
def test_binary_is_packed_sign_bits(stub, refs, model, dimensions):
    outputs = [pb.OUTPUT_TYPE_BINARY, pb.OUTPUT_TYPE_DENSE]
    response = embed(stub, model=model, inputs=TEXTS, outputs=outputs, dimensions=dimensions, task=2)
    assert len(response.embeddings) == 2 * len(TEXTS)
    for i, text in enumerate(TEXTS):
        binary, dense = response.embeddings[2 * i], response.embeddings[2 * i + 1]
        assert (binary.index, dense.index) == (i, i)
        assert binary.WhichOneof("vector") == "binary" and dense.WhichOneof("vector") == "dense"
        expected = refs[model].dense(text, 2, dimensions)
        COSINES.check(f"jina-v3/{model}/dense", dense.dense.values, expected)
        assert_binary_matches(binary.binary.bits, binary.binary.dimensions, expected)


def test_unknown_task_value_is_refused(stub):
    error = rpc_error(embed, stub, inputs=["cats"], task=9)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task" in error.details()


def test_outputs_the_model_lacks_are_refused(stub):
    for output in (pb.OUTPUT_TYPE_SPARSE, pb.OUTPUT_TYPE_COLBERT):
        error = rpc_error(embed, stub, inputs=["cats"], outputs=[pb.OUTPUT_TYPE_DENSE, output])
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "outputs[1]" in error.details()


# --- padding, batching, truncation ------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_mixed_lengths_in_one_batch_match_single_inputs(stub, refs, model):
    texts = ["a", "The quick brown fox jumps over the lazy dog and the cat sat on the mat", "b c"]
    together = dense_rows(embed(stub, model=model, inputs=texts, task=3))
    for text, row in zip(texts, together, strict=True):
        alone = dense_rows(embed(stub, model=model, inputs=[text], task=3))[0]
        np.testing.assert_allclose(row, alone, atol=2e-6)
        COSINES.check(f"jina-v3/{model}/dense", row, refs[model].dense(text, 3))


def test_concurrent_requests_of_all_tasks_batch_correctly(stub, refs):
    """Requests of different tasks arriving together: one task per run, every vector right."""
    jobs = [
        (model, task, TEXTS[(i + task) % len(TEXTS)]) for i, model in enumerate(MODELS * 3) for task in TASKS
    ]

    def one(job):
        model, task, text = job
        return dense_rows(embed(stub, model=model, inputs=[text, "cats"], task=task))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs))
    for (model, task, text), rows in zip(jobs, results, strict=True):
        COSINES.check(f"jina-v3/{model}/dense", rows[0], refs[model].dense(text, task))
        COSINES.check(f"jina-v3/{model}/dense", rows[1], refs[model].dense("cats", task))


@pytest.mark.parametrize("model", MODELS)
def test_over_long_input_refused_unless_truncate(stub, refs, model):
    inputs = ["cats", LONG_TEXT]
    error = rpc_error(embed, stub, model=model, inputs=inputs)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in error.details() and str(JINA_MAX_TOKENS) in error.details()

    response = embed(stub, model=model, inputs=inputs, truncate=True, task=pb.TASK_RETRIEVAL_PASSAGE)
    rows = dense_rows(response)
    ref = refs[model]
    cut = ref.token_ids(LONG_TEXT, 2, JINA_MAX_TOKENS)
    assert len(cut) == JINA_MAX_TOKENS and cut[0] == 0 and cut[-1] == 2
    COSINES.check(f"jina-v3/{model}/truncated", rows[1], ref.dense(LONG_TEXT, 2, max_tokens=JINA_MAX_TOKENS))
    COSINES.check(f"jina-v3/{model}/dense", rows[0], ref.dense("cats", 2))
    assert response.usage.prompt_tokens == len(ref.token_ids("cats", 2)) + JINA_MAX_TOKENS


def test_input_of_exactly_max_tokens_is_accepted(stub, refs):
    ref = refs["jina"]
    words = LONG_TEXT.split()
    text = next(
        " ".join(words[:n])
        for n in range(len(words), 0, -1)
        if len(ref.token_ids(" ".join(words[:n]), 3)) <= 64
    )
    assert len(ref.token_ids(text, 3)) in (JINA_MAX_TOKENS - 1, JINA_MAX_TOKENS)
    response = embed(stub, inputs=[text], task=3)
    COSINES.check("jina-v3/jina/dense", dense_rows(response)[0], ref.dense(text, 3))


# --- late chunking -------------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("task", [pb.TASK_UNSPECIFIED, pb.TASK_RETRIEVAL_PASSAGE, pb.TASK_SEPARATION])
@pytest.mark.parametrize("dimensions", [0, 16])
def test_late_chunking_matches_reference(stub, refs, model, task, dimensions):
    ref = refs[model]
    response = embed(stub, model=model, inputs=CHUNKS, task=task, dimensions=dimensions, late_chunking=True)
    rows = dense_rows(response)
    assert len(rows) == len(CHUNKS)
    assert [e.index for e in response.embeddings] == list(range(len(CHUNKS)))
    expected = ref.late_chunks(CHUNKS, task, dimensions)
    for row, want in zip(rows, expected, strict=True):
        assert row.shape == (dimensions or JINA_HIDDEN,)
        COSINES.check(f"jina-v3/{model}/late-chunking", row, want)
    assert response.usage.prompt_tokens == ref.document_length(CHUNKS, task)
    # a chunk's vector is not the chunk embedded alone: the whole document was seen
    alone = ref.dense(CHUNKS[1], task, dimensions)
    assert float(rows[1] @ alone) < 0.999


def test_late_chunking_prefix_tokens_land_in_the_first_span(stub, refs):
    """With retrieval.passage, the instruction tokens are pooled into chunk 0 only."""
    ref = refs["jina"]
    rows = dense_rows(embed(stub, inputs=CHUNKS, task=2, late_chunking=True))
    prefix = ref.prefix(2)
    document = ref.tokenizer.encode(prefix + " ".join(CHUNKS))
    states = backbone_states(ref.model.weights, document.ids, ref.adapter_index(2))
    prefix_tokens = len(ref.tokenizer.encode(prefix.strip()).ids) - 2
    first_chunk_tokens = len(ref.tokenizer.encode(CHUNKS[0]).ids) - 2
    with_prefix = states[: 1 + prefix_tokens + first_chunk_tokens].mean(0)
    without_prefix = states[1 + prefix_tokens : 1 + prefix_tokens + first_chunk_tokens].mean(0)
    with_prefix, without_prefix = (v / np.linalg.norm(v) for v in (with_prefix, without_prefix))
    assert float(rows[0] @ with_prefix) > 0.9999
    assert float(rows[0] @ without_prefix) < 0.999


def test_late_chunking_with_binary_and_a_single_chunk(stub, refs):
    ref = refs["jina"]
    response = embed(
        stub,
        inputs=CHUNKS,
        task=3,
        late_chunking=True,
        outputs=[pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY],
        dimensions=8,
    )
    expected = ref.late_chunks(CHUNKS, 3, 8)
    assert len(response.embeddings) == 2 * len(CHUNKS)
    for i, want in enumerate(expected):
        dense, binary = response.embeddings[2 * i : 2 * i + 2]
        assert dense.index == binary.index == i
        COSINES.check("jina-v3/jina/late-chunking", dense.dense.values, want)
        assert_binary_matches(binary.binary.bits, binary.binary.dimensions, want)
    single = dense_rows(embed(stub, inputs=[CHUNKS[0]], task=3, late_chunking=True))
    # one chunk = the whole document: same as an ordinary embedding
    COSINES.check("jina-v3/jina/late-chunking", single[0], ref.dense(CHUNKS[0], 3))


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_late_chunking_refuses_empty_or_blank_chunks(stub, bad):
    error = rpc_error(embed, stub, inputs=["cats", bad, "dogs"], late_chunking=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1]" in error.details()


def test_late_chunking_refuses_a_document_over_max_document_tokens(stub, refs):
    """Longer than one window is fine now (tests/test_late_chunking_long.py); over 16 windows is not."""
    limit = 16 * JINA_MAX_TOKENS
    chunks = ["the old red house by the river and the green garden"] * 100
    length = refs["jina"].document_length(chunks, 3)
    assert length > limit
    error = rpc_error(embed, stub, inputs=chunks, task=3, late_chunking=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(length) in error.details() and str(limit) in error.details()
    # truncate does not apply to late chunking: still refused
    error = rpc_error(embed, stub, inputs=chunks, task=3, late_chunking=True, truncate=True)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # and the server still serves
    assert len(dense_rows(embed(stub, inputs=CHUNKS, task=3, late_chunking=True))) == 3


def test_stream_embed_matches_reference(stub, refs):
    requests = [pb.EmbedRequest(request_id=str(task), inputs=TEXTS[:2], task=task) for task in TASKS]
    replies = {r.request_id: r for r in stub.StreamEmbed(iter(requests), timeout=30)}
    assert set(replies) == {str(t) for t in TASKS}
    for task in TASKS:
        for text, row in zip(TEXTS[:2], dense_rows(replies[str(task)]), strict=True):
            COSINES.check("jina-v3/jina/dense", row, refs["jina"].dense(text, task))
