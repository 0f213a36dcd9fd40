"""tests.support.xlmr: the tiny XLM-R graphs compute what numpy computes from the same arrays.

The expectations come from ``xlmr_forward`` (plain numpy, float64), never from ONNX;
the graphs must also keep the attention pattern that
embedding_server.models.attention rewrites, load in the server as their family,
and ship heads the server's torch-free reader reads back bit for bit.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from embedding_server.models.base import RowRequest
from embedding_server.models.loaded import LoadedModel
from embedding_server.models.loader import ModelSpec, load
from embedding_server.models.torch_weights import load_state_dict
from embedding_server.models.types import Output, SequenceVectors, Task

from tests.support import xlmr
from tests.support.synthetic import BGE_M3_HEADS, BOS_ID, EOS_ID, JINA_ADAPTERS, PAD_ID
from tests.support.torch_zip import save_state_dict
from tests.support.xlmr import (
    BGE_M3,
    JINA_V3,
    XlmrDir,
    make_bge_m3_xlmr,
    make_jina_v3_xlmr,
    tiny_shape,
    xlmr_forward,
)

SHAPE = tiny_shape(32)
LENGTHS = (11, 6, 3)  # one padded batch: every row but the first has padding
TEXTS = ["The quick brown fox jumps over the lazy dog.", "cats", "Where is the capital of France?"]
ATOL = 1e-4


@pytest.fixture(scope="module")
def jina(tmp_path_factory: pytest.TempPathFactory) -> XlmrDir:
    return make_jina_v3_xlmr(tmp_path_factory.mktemp("xlmr") / "jina-v3", SHAPE)


@pytest.fixture(scope="module")
def bge(tmp_path_factory: pytest.TempPathFactory) -> XlmrDir:
    return make_bge_m3_xlmr(tmp_path_factory.mktemp("xlmr") / "bge-m3", SHAPE)


def batch(lengths: tuple[int, ...] = LENGTHS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``<s> ids </s>`` rows padded on the right with the pad id, and their mask."""
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD_ID, np.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = [BOS_ID, *rng.integers(4, SHAPE.vocab, n - 2), EOS_ID]
    return ids, (ids != PAD_ID).astype(np.int64)


def session(model: XlmrDir) -> ort.InferenceSession:
    return ort.InferenceSession(str(model.onnx_path), providers=["CPUExecutionProvider"])


def weights_of(model: XlmrDir) -> xlmr.XlmrWeights:
    assert model.weights is not None
    return model.weights


# --- the graphs against numpy ----------------------------------------------------------------------


def test_jina_v3_matches_numpy_for_every_task(jina: XlmrDir) -> None:
    ids, mask = batch()
    run = session(jina)
    real = mask.astype(bool)
    outputs = []
    for task in range(len(JINA_ADAPTERS)):
        (states,) = run.run(
            ["text_embeds"], {"input_ids": ids, "attention_mask": mask, "task_id": np.array(task, np.int64)}
        )
        expected = xlmr_forward(weights_of(jina), JINA_V3, ids, mask, task)
        assert states.shape == (len(LENGTHS), max(LENGTHS), SHAPE.hidden) and states.dtype == np.float32
        np.testing.assert_allclose(states[real], expected[real], atol=ATOL, rtol=0)
        outputs.append(states[real])
    for a in range(len(outputs)):  # every adapter changes the states
        for b in range(a):
            assert np.abs(outputs[a] - outputs[b]).max() > 0.05, (a, b)


def test_bge_m3_matches_numpy(bge: XlmrDir) -> None:
    ids, mask = batch(seed=1)
    tokens, sentence = session(bge).run(
        ["token_embeddings", "sentence_embedding"], {"input_ids": ids, "attention_mask": mask}
    )
    expected = xlmr_forward(weights_of(bge), BGE_M3, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(tokens[real], expected[real], atol=ATOL, rtol=0)
    cls = expected[:, 0] / np.linalg.norm(expected[:, 0], axis=-1, keepdims=True)
    np.testing.assert_allclose(sentence, cls, atol=ATOL, rtol=0)


def test_padding_rows_do_not_change_real_tokens(bge: XlmrDir, jina: XlmrDir) -> None:
    """A row computed alone equals the same row in a padded batch (the mask reaches every layer)."""
    ids, mask = batch()
    for model, extra in ((bge, {}), (jina, {"task_id": np.array(1, np.int64)})):
        run = session(model)
        padded = run.run(None, {"input_ids": ids, "attention_mask": mask, **extra})[0]
        n = LENGTHS[2]
        alone = run.run(None, {"input_ids": ids[2:, :n], "attention_mask": mask[2:, :n], **extra})[0]
        np.testing.assert_allclose(padded[2, :n], alone[0], atol=ATOL, rtol=0)


def test_outputs_are_not_degenerate(bge: XlmrDir, jina: XlmrDir) -> None:
    """Tokens differ from each other, and each token's state depends on the others (attention works)."""
    ids, mask = batch(lengths=(12,), seed=2)
    changed = ids.copy()
    changed[0, -2] = (changed[0, -2] + 7) % (SHAPE.vocab - 4) + 4
    for model, extra in ((bge, {}), (jina, {"task_id": np.array(0, np.int64)})):
        run = session(model)
        states = run.run(None, {"input_ids": ids, "attention_mask": mask, **extra})[0][0]
        other = run.run(None, {"input_ids": changed, "attention_mask": mask, **extra})[0][0]
        distances = np.linalg.norm(states[:, None] - states[None, :], axis=-1)
        assert distances[~np.eye(len(states), dtype=bool)].min() > 0.5  # unit-scale states, all distinct
        assert np.abs(other[0] - states[0]).max() > 1e-2  # <s> sees a token ten places away


# --- the graph's structure --------------------------------------------------------------------------


def graph_of(model: XlmrDir) -> onnx.GraphProto:
    proto = onnx.load(str(model.onnx_path), load_external_data=False)
    assert proto.ir_version == 8
    assert [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
    return proto.graph


def inline(graph: onnx.GraphProto, name: str) -> np.ndarray:
    tensor = next(t for t in graph.initializer if t.name == name)
    assert tensor.data_location != onnx.TensorProto.EXTERNAL, f"{name} must stay inline"
    return onnx.numpy_helper.to_array(tensor)


def attribute(node: onnx.NodeProto, name: str) -> object:
    return onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == name))


@pytest.mark.parametrize("family", [JINA_V3, BGE_M3])
def test_attention_pattern(family: str, jina: XlmrDir, bge: XlmrDir) -> None:
    """Per layer: MatMul(q, Transpose(k, 0132)) · Mul(1/sqrt(D)) · Add(shared mask) · Softmax · MatMul(v)."""
    model = jina if family == JINA_V3 else bge
    graph = graph_of(model)
    producer = {out: node for node in graph.node for out in node.output}
    consumers = Counter(name for node in graph.node for name in node.input)
    ops = Counter(node.op_type for node in graph.node)
    assert ops["Softmax"] == SHAPE.layers and ops["Erf"] == SHAPE.layers
    assert ops["LayerNormalization"] == 2 * SHAPE.layers + 1
    assert {node.domain for node in graph.node} == {""}  # no contrib ops
    assert all(
        attribute(n, "epsilon") == pytest.approx(1e-5)
        for n in graph.node
        if n.op_type == "LayerNormalization"
    )

    def made_by(name: str, op_type: str) -> onnx.NodeProto:
        node = producer[name]
        assert node.op_type == op_type, (name, node.op_type, op_type)
        return node

    def heads(name: str, prefix: str) -> None:
        """``name`` = Transpose(Reshape(Add(..., bias), [0,0,N,D]), 0213)."""
        transpose = made_by(name, "Transpose")
        assert attribute(transpose, "perm") == [0, 2, 1, 3] and transpose.name == f"{prefix}/transpose"
        reshape = made_by(transpose.input[0], "Reshape")
        assert inline(graph, reshape.input[1]).tolist() == [0, 0, SHAPE.heads, SHAPE.head_dim]
        linear = made_by(reshape.input[0], "Add")
        if family == JINA_V3:  # Add(Add(MatMul(x, W), b), MatMul(MatMul(x, Gather(A)), Gather(B)))
            lora = made_by(linear.input[1], "MatMul")
            assert made_by(lora.input[1], "Gather").input[1] == "task_id"
            assert made_by(made_by(lora.input[0], "MatMul").input[1], "Gather").input[1] == "task_id"
            linear = made_by(linear.input[0], "Add")
        made_by(linear.input[0], "MatMul")

    def rotary_input(name: str) -> str:
        rotary = made_by(name, "Add")
        mul_cos, mul_sin = made_by(rotary.input[0], "Mul"), made_by(rotary.input[1], "Mul")
        assert (mul_cos.input[1], mul_sin.input[1]) == ("rotary/cos", "rotary/sin")
        concat = made_by(mul_sin.input[0], "Concat")
        second = made_by(made_by(concat.input[0], "Neg").input[0], "Slice")
        first = made_by(concat.input[1], "Slice")
        assert inline(graph, first.input[1]).tolist() == [0] and inline(graph, second.input[2]).tolist() == [
            SHAPE.head_dim
        ]
        assert first.input[2] == second.input[1]  # split at D/2
        assert first.input[0] == second.input[0] == mul_cos.input[0]
        return mul_cos.input[0]

    mask_node = made_by("attention_mask/extended", "Mul")
    assert inline(graph, mask_node.input[1]) == pytest.approx(-10000.0)
    invert = made_by(mask_node.input[0], "Sub")
    assert inline(graph, invert.input[0]) == 1.0
    cast = made_by(invert.input[1], "Cast")
    unsqueeze = made_by(cast.input[0], "Unsqueeze")
    assert unsqueeze.input[0] == "attention_mask" and inline(graph, unsqueeze.input[1]).tolist() == [1, 2]
    assert consumers["attention_mask/extended"] == SHAPE.layers  # computed once, used by every layer

    for i in range(SHAPE.layers):
        at = f"layer{i}/attention"
        softmax = made_by(f"{at}/softmax", "Softmax")
        assert attribute(softmax, "axis") == -1
        masked = made_by(softmax.input[0], "Add")
        assert masked.input[1] == "attention_mask/extended"
        scaled = made_by(masked.input[0], "Mul")
        assert inline(graph, scaled.input[1]) == pytest.approx(1 / np.sqrt(SHAPE.head_dim))
        scores = made_by(scaled.input[0], "MatMul")
        kt = made_by(scores.input[1], "Transpose")
        assert attribute(kt, "perm") == [0, 1, 3, 2]
        q, k = scores.input[0], kt.input[0]
        if family == JINA_V3:  # rotary on [B,N,S,D]: Add(Mul(t, cos), Mul(Concat(-t2, t1), sin))
            q, k = rotary_input(q), rotary_input(k)
        heads(q, f"{at}/q")
        heads(k, f"{at}/k")
        (pv,) = [node for node in graph.node if softmax.output[0] in node.input]
        assert pv.op_type == "MatMul" and pv.input[0] == softmax.output[0] and pv.name == f"{at}/context"
        heads(pv.input[1], f"{at}/v")
        (back,) = [node for node in graph.node if pv.output[0] in node.input]
        assert back.op_type == "Transpose" and attribute(back, "perm") == [0, 2, 1, 3]
        (merge,) = [node for node in graph.node if back.output[0] in node.input]
        assert merge.op_type == "Reshape" and inline(graph, merge.input[1]).tolist() == [0, 0, SHAPE.hidden]
    if family == BGE_M3:
        assert "rotary/cos" not in producer and "embeddings/position" in producer
    else:
        assert "embeddings/position" not in producer


@pytest.mark.parametrize("family", [JINA_V3, BGE_M3])
def test_attention_rewrite_finds_every_layer(family: str, jina: XlmrDir, bge: XlmrDir) -> None:
    """The module that pattern-matches these graphs finds one attention core per layer."""
    attention = pytest.importorskip("embedding_server.models.attention")
    model = jina if family == JINA_V3 else bge
    proto = onnx.load(str(model.onnx_path), load_external_data=False)
    assert attention.fuse_attention(proto) == SHAPE.layers


# --- files ------------------------------------------------------------------------------------------


def test_directory_layout_and_configs(jina: XlmrDir, bge: XlmrDir) -> None:
    for model in (jina, bge):
        config = json.loads((model.path / "config.json").read_text())
        assert config["hidden_size"] == SHAPE.hidden and config["num_hidden_layers"] == SHAPE.layers
        assert config["num_attention_heads"] == SHAPE.heads and config["intermediate_size"] == SHAPE.ffn
        assert config["max_position_embeddings"] == SHAPE.positions and config["vocab_size"] == SHAPE.vocab
        assert config["pad_token_id"] == PAD_ID and config["layer_norm_eps"] == 1e-5
        tokenizer = json.loads((model.path / "tokenizer_config.json").read_text())
        assert tokenizer["model_max_length"] == SHAPE.positions - 2
        assert (model.path / "onnx" / "model.onnx_data").is_file()
    jina_config = json.loads((jina.path / "config.json").read_text())
    assert jina_config["lora_adaptations"] == list(JINA_ADAPTERS)
    assert jina_config["matryoshka_dimensions"] == [32]  # the published list, cut at the width
    assert (bge.path / "onnx" / "Constant_7_attr__value").is_file()
    graph = graph_of(bge)
    (constant,) = [node for node in graph.node if node.op_type == "Constant"]
    tensor = constant.attribute[0].t
    assert constant.name == "Constant_7" and tensor.data_location == onnx.TensorProto.EXTERNAL
    assert {e.key: e.value for e in tensor.external_data}["location"] == "Constant_7_attr__value"


def test_heads_round_trip_through_the_server_reader(bge: XlmrDir) -> None:
    weights = weights_of(bge)
    for name, head in (("sparse_linear", weights.sparse), ("colbert_linear", weights.colbert)):
        assert head is not None
        state = load_state_dict(bge.path / f"{name}.pt")
        assert sorted(state) == ["bias", "weight"]
        for key, expected in (("weight", head.weight), ("bias", head.bias)):
            assert state[key].dtype == np.float16
            np.testing.assert_array_equal(state[key], expected.astype(np.float16))
            np.testing.assert_array_equal(state[key].astype(np.float32), expected)  # float16 values exactly
    assert weights.sparse is not None and weights.sparse.weight.shape == (1, SHAPE.hidden)
    assert weights.colbert is not None and weights.colbert.weight.shape == (SHAPE.hidden, SHAPE.hidden)


def test_torch_zip_writer_matches_torch(tmp_path: Path) -> None:
    """Torch's own fixture and this writer's copy of its arrays read back equal; other dtypes too."""
    for name in ("sparse_linear", "colbert_linear"):
        arrays = {key: np.load(BGE_M3_HEADS / f"{name}.{key}.npy") for key in ("weight", "bias")}
        save_state_dict(tmp_path / f"{name}.pt", arrays)
        ours, torch = load_state_dict(tmp_path / f"{name}.pt"), load_state_dict(BGE_M3_HEADS / f"{name}.pt")
        assert list(ours) == list(torch)
        for key in torch:
            assert ours[key].dtype == torch[key].dtype
            np.testing.assert_array_equal(ours[key], torch[key])
    rng = np.random.default_rng(0)
    mixed: dict[str, np.ndarray] = {
        "a": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "b": np.arange(70000, dtype=np.int64),
        "c": np.array(2.5, np.float64),
    }
    save_state_dict(tmp_path / "mixed.pt", mixed)
    back = load_state_dict(tmp_path / "mixed.pt")
    for key, value in mixed.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


# --- in the server ----------------------------------------------------------------------------------


def server_vectors(
    loaded: LoadedModel, task: Task, outputs: frozenset[Output]
) -> tuple[list[SequenceVectors], np.ndarray, np.ndarray]:
    """What the server computes for TEXTS: its tokenizer, padding, session run and postprocess."""
    model = loaded.model
    tokenized = model.tokenize(TEXTS, task, truncate=False)
    ids = np.full((len(tokenized), max(len(t) for t in tokenized)), model.tokenizer.pad_id, np.int64)
    for row, t in enumerate(tokenized):
        ids[row, : len(t)] = t
    mask = (np.arange(ids.shape[1])[None] < np.array([[len(t)] for t in tokenized])).astype(np.int64)
    results = loaded.sessions.run(0, model.output_names, model.feeds(ids, mask, task))
    rows = [RowRequest(length=len(t), outputs=outputs) for t in tokenized]
    return model.postprocess(results, ids, mask, rows), ids, mask


def test_jina_v3_serves_in_the_server(jina: XlmrDir) -> None:
    loaded = load(ModelSpec("jina-xlmr", jina.path))
    description = loaded.model.description
    assert description.family == JINA_V3 and description.dimensions == SHAPE.hidden
    assert description.max_tokens == SHAPE.max_tokens and description.matryoshka_dimensions == (32,)
    vectors, ids, mask = server_vectors(loaded, Task.SEPARATION, frozenset({Output.DENSE}))
    states = xlmr_forward(weights_of(jina), JINA_V3, ids, mask, JINA_ADAPTERS.index("separation"))
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    for row, vector in enumerate(vectors):
        assert vector.dense is not None
        np.testing.assert_allclose(vector.dense[0], pooled[row], atol=ATOL, rtol=0)


def test_bge_m3_serves_in_the_server(bge: XlmrDir) -> None:
    loaded = load(ModelSpec("bge-xlmr", bge.path))
    description = loaded.model.description
    assert description.family == BGE_M3 and description.dimensions == SHAPE.hidden
    assert set(description.outputs) >= {Output.DENSE, Output.SPARSE, Output.COLBERT}
    wanted = frozenset({Output.DENSE, Output.SPARSE, Output.COLBERT})
    vectors, ids, mask = server_vectors(loaded, Task.UNSPECIFIED, wanted)
    weights = weights_of(bge)
    assert weights.colbert is not None and weights.sparse is not None
    states = xlmr_forward(weights, BGE_M3, ids, mask)
    found = 0
    for row, vector in enumerate(vectors):
        n = int(mask[row].sum())
        assert vector.dense is not None and vector.colbert is not None and vector.sparse is not None
        np.testing.assert_allclose(vector.dense[0], states[row, 0], atol=ATOL, rtol=0)
        colbert = states[row, 1:n] @ weights.colbert.weight.T + weights.colbert.bias
        np.testing.assert_allclose(vector.colbert, colbert, atol=ATOL, rtol=0)  # drops <s>, keeps </s>
        sparse = np.maximum(states[row, :n] @ weights.sparse.weight.T + weights.sparse.bias, 0)[:, 0]
        real = (sparse > 0) & (ids[row, :n] > 3)  # specials <s> <pad> </s> <unk> are 0..3
        expected = {int(t): float(sparse[real & (ids[row, :n] == t)].max()) for t in ids[row, :n][real]}
        assert dict(
            zip(vector.sparse.ids.tolist(), vector.sparse.weights.tolist(), strict=True)
        ) == pytest.approx(expected, abs=ATOL)
        found += len(expected)
    assert found > 0


# --- the full-size cache and the CLI (at a tiny shape) ----------------------------------------------


def test_full_size_dir_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xlmr, "FULL_SHAPE", tiny_shape(8))
    path = xlmr.full_size_dir(BGE_M3, cache=tmp_path)
    assert path == tmp_path / "synthetic-full" / f"bge-m3-v{xlmr.BUILDER_VERSION}"
    assert (path / xlmr.COMPLETE_MARKER).is_file() and (path / "onnx" / "model.onnx").is_file()
    stamp = (path / "onnx" / "model.onnx_data").stat().st_mtime_ns
    assert xlmr.full_size_dir(BGE_M3, cache=tmp_path) == path
    assert (path / "onnx" / "model.onnx_data").stat().st_mtime_ns == stamp  # not rebuilt
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left behind


def test_cli_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(xlmr, "FULL_SHAPE", tiny_shape(8))
    assert xlmr.main(["build", JINA_V3, "--out", str(tmp_path / "jina")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "jina")
    assert (
        session(XlmrDir(tmp_path / "jina", JINA_V3, tiny_shape(8), 3, None)).get_inputs()[2].name == "task_id"
    )
