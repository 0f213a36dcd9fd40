"""ONNX Runtime's attention rewrite (models/attention.py): the flash kernel for unpadded runs, the
original ops for padded ones, both equal to numpy; an export it would change is left as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from embedding_server.models import attention
from embedding_server.models.sessions import SessionPool, session_options
from onnx import TensorProto, helper, numpy_helper

from tests.support.xlmr import BGE_M3, FAMILIES, JINA_V3, XlmrDir, make_xlmr, tiny_shape, xlmr_forward

PAD = 1


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> XlmrDir:
    family = str(request.param)
    return make_xlmr(family, tmp_path_factory.mktemp(family), tiny_shape(24), seed=9)


def batch(lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Ids <s> w.. </s> padded with <pad> on the right, and their mask."""
    longest = max(lengths)
    ids = np.full((len(lengths), longest), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = [0, *(4 + (7 * row + 3 * i) % 40 for i in range(length - 2)), 2]
        mask[row, :length] = 1
    return ids, mask


def feeds(model: XlmrDir, ids: np.ndarray, mask: np.ndarray, task: int = 1) -> dict[str, np.ndarray]:
    out = {"input_ids": ids, "attention_mask": mask}
    if model.family == JINA_V3:
        out["task_id"] = np.array(task, np.int64)
    return out


def states_name(model: XlmrDir) -> str:
    return "text_embeds" if model.family == JINA_V3 else "token_embeddings"


def test_every_layers_attention_is_fused(tiny: XlmrDir):
    graph = onnx.load(str(tiny.onnx_path), load_external_data=False)
    assert attention.fuse_attention(graph) == tiny.shape.layers
    checked = tiny.onnx_path.with_name("fused.onnx")  # beside its weights: the checker reads them
    onnx.save_model(graph, str(checked))
    onnx.checker.check_model(str(checked))
    plain = [
        node
        for node in graph.graph.node
        if node.op_type in ("Softmax", "MatMul") and "attention" in node.name
    ]
    assert not [node for node in plain if node.op_type == "Softmax"]  # all moved into the Ifs
    ifs = [node for node in graph.graph.node if node.op_type == "If"]
    assert len(ifs) == tiny.shape.layers
    branches = {a.name: a.g for a in ifs[0].attribute}
    then_ops = {node.op_type for node in branches["then_branch"].node}
    else_ops = [node.op_type for node in branches["else_branch"].node]
    assert "MultiHeadAttention" in then_ops and "Softmax" not in then_ops
    assert else_ops[0] == "MatMul" and "Softmax" in else_ops and else_ops[-1] == "MatMul"


@pytest.mark.parametrize("lengths", [[17], [17, 9, 4], [6, 6]])
def test_the_fused_graph_equals_numpy_padded_or_not(tiny: XlmrDir, lengths: list[int]):
    """One sequence and equal lengths take the kernel, a padded batch the original ops."""
    assert tiny.weights is not None
    pool = SessionPool(tiny.onnx_path)
    assert pool.fused_attention == tiny.shape.layers and pool.attention == "fused"
    ids, mask = batch(lengths)
    got = pool.run(0, [states_name(tiny)], feeds(tiny, ids, mask))[states_name(tiny)]
    want = xlmr_forward(tiny.weights, tiny.family, ids, mask, 1 if tiny.family == JINA_V3 else None)
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(got[row, :length], want[row, :length], atol=2e-5, rtol=1e-4)


def executed_ops(graph: bytes, directory: Path, inputs: dict[str, np.ndarray], tmp_path: Path) -> set[str]:
    """The op types ONNX Runtime's profiler saw run (If branches included)."""
    options = session_options(1)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(directory))
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    session.run(None, inputs)
    events = json.loads(Path(session.end_profiling()).read_text())
    return {event["args"]["op_name"] for event in events if "op_name" in event.get("args", {})}


def test_an_unpadded_run_takes_the_kernel_and_a_padded_one_the_original_ops(tiny: XlmrDir, tmp_path: Path):
    fused = attention.fused_graph(tiny.onnx_path)
    assert fused is not None
    graph, _ = fused
    alone = executed_ops(graph, tiny.onnx_path.parent, feeds(tiny, *batch([12])), tmp_path)
    padded = executed_ops(graph, tiny.onnx_path.parent, feeds(tiny, *batch([12, 5])), tmp_path)
    assert "MultiHeadAttention" in alone and "Softmax" not in alone
    assert "Softmax" in padded and "MultiHeadAttention" not in padded


def with_position_bias(model: XlmrDir, target: Path) -> Path:
    """The model with a key-position bias added to the mask: an additive term that is not only padding."""
    graph = onnx.load(str(model.onnx_path), load_external_data=False)
    extended = "attention_mask/extended"
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["bias/mask_float"], to=TensorProto.FLOAT),
        helper.make_node("CumSum", ["bias/mask_float", "bias/axis"], ["bias/positions"]),
        helper.make_node("Mul", ["bias/positions", "bias/slope"], ["bias/slopes"]),
        helper.make_node("Unsqueeze", ["bias/slopes", "bias/axes"], ["bias/b11s"]),
        helper.make_node("Add", [extended, "bias/b11s"], ["bias/extended"]),
    ]
    for node in graph.graph.node:
        node.input[:] = ["bias/extended" if name == extended else name for name in node.input]
    graph.graph.node.extend(nodes)
    graph.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(1, np.int64), "bias/axis"),
            numpy_helper.from_array(np.array(0.5, np.float32), "bias/slope"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "bias/axes"),
        ]
    )
    attention._topological_sort(graph.graph)
    target.mkdir(parents=True, exist_ok=True)
    for data in model.onnx_path.parent.iterdir():
        if data.name != "model.onnx":
            (target / data.name).write_bytes(data.read_bytes())  # ONNX Runtime refuses links out
    onnx.save_model(graph, str(target / "model.onnx"))
    return target / "model.onnx"


def test_an_export_whose_additive_term_is_not_only_padding_is_served_unfused(
    tiny: XlmrDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    path = with_position_bias(tiny, tmp_path / "biased")
    assert attention.fused_graph(path) is not None  # the pattern matches: only the check can tell
    plain = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    pool = SessionPool(path)
    assert pool.fused_attention == 0 and pool.attention == "plain"
    assert "attention left unfused" in caplog.text and "differ" in caplog.text
    inputs = feeds(tiny, *batch([11]))
    name = states_name(tiny)
    np.testing.assert_array_equal(pool.run(0, [name], inputs)[name], plain.run([name], inputs)[0])


def test_a_graph_without_plain_attention_is_left_as_it_is(tmp_path: Path):
    """The built-in MiniLM already uses MultiHeadAttention: nothing matches, the file is served."""
    from embedding_server.models.loader import builtin_files

    path = builtin_files().onnx
    assert attention.fused_graph(path) is None
    assert SessionPool(path).attention == "plain"


def test_bge_m3s_sentence_embedding_survives_the_rewrite(tmp_path: Path):
    model = make_xlmr(BGE_M3, tmp_path / "bge", tiny_shape(24), seed=4)
    pool = SessionPool(model.onnx_path)
    assert pool.attention == "fused"
    out = pool.run(0, ["sentence_embedding"], feeds(model, *batch([15])))["sentence_embedding"]
    assert out.shape == (1, model.shape.hidden)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
