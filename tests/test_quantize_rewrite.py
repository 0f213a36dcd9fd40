"""The per-row int8 MatMul rewrite against plain numpy, in both graph forms.

Opset 21 quantizes each row with one blocked QuantizeLinear; older opsets
divide first (Div + QuantizeLinear). Both must compute exactly the scheme of
quantize/rewrite.py's docstring, written out here in numpy: per-row activation
scale max|x| / 127, uint8 with zero point 128, per-column symmetric int8 weights
(stored as int8, or as uint8 + 128 where this machine's int8 kernel saturates).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from embedding_server.quantize.rewrite import (
    name_nodes,
    quantize_matmuls,
    signed_weights_exact,
    weight_matmuls,
)
from onnx import TensorProto, helper, numpy_helper

K, N = 64, 24


def one_matmul(weight: np.ndarray, opset: int, bias: np.ndarray | None = None) -> onnx.ModelProto:
    """x @ w (+ bias): the graph form of every projection in the models we serve."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "length", N])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["xw" if bias is not None else "y"])]
    initializers = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        nodes.append(helper.make_node("Add", ["xw", "b"], ["y"]))
        initializers.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(nodes, "g", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10 if opset >= 21 else 8
    return model


def numpy_int8(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The scheme in integers: round-half-even as ONNX rounds, uint8 saturation, int32 sums."""
    x_scale = np.maximum(np.abs(x).max(-1, keepdims=True), 1e-12) / 127
    x_q = np.clip(np.rint(x / x_scale) + 128, 0, 255).astype(np.int64) - 128
    w_scale = np.maximum(np.abs(weight).max(0), 1e-12) / 127
    w_q = np.clip(np.rint(weight / w_scale), -127, 127).astype(np.int64)
    return (x_q @ w_q).astype(np.float64) * w_scale * x_scale


def saturating_product(signed_weights: bool) -> float:
    """The rewrite's worst relative error to the integer scheme on rows at full scale."""
    rng = np.random.default_rng(5)
    weight = np.abs(rng.normal(size=(K, N))).astype(np.float32)  # all positive: sums of +127s
    model = one_matmul(weight, 21)
    name_nodes(model)
    quantized = quantize_matmuls(model, weight_matmuls(model), signed_weights=signed_weights)
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((1, 2, K), np.float32)  # every activation at +127: u8 255
    got = session.run(None, {"x": x})[0]
    expected = numpy_int8(x.astype(np.float64), weight.astype(np.float64))
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_the_weight_form_is_the_one_this_machine_multiplies_exactly():
    """The probe's verdict against the rewrite itself: signed weights are exact here iff the probe
    says so, and unsigned weights are exact on every machine."""
    assert saturating_product(signed_weights=False) < 1e-6
    assert (saturating_product(signed_weights=True) < 1e-6) == signed_weights_exact()


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("signed_weights", [False, None])  # None: the form this machine gets
def test_per_row_int8_matmul_is_the_numpy_scheme(opset: int, with_bias: bool, signed_weights: bool | None):
    rng = np.random.default_rng(opset)
    weight = rng.normal(size=(K, N)).astype(np.float32)
    bias = rng.normal(size=N).astype(np.float32) if with_bias else None
    model = one_matmul(weight, opset, bias)
    name_nodes(model)
    quantized = quantize_matmuls(model, weight_matmuls(model), signed_weights=signed_weights)
    ops = [node.op_type for node in quantized.graph.node]
    # The form under test: blocked QuantizeLinear (no Div) from opset 21, Div before it earlier;
    # the row scale applied inside MatMulIntegerToFloat (no Mul after it; the bias Add stays).
    assert ("Div" in ops) == (opset < 21) and "Abs" not in ops
    assert ops[-2:] == ["MatMulIntegerToFloat", "Add"] if with_bias else ops[-1] == "MatMulIntegerToFloat"
    session = ort.InferenceSession(quantized.SerializeToString(), providers=["CPUExecutionProvider"])
    # rows of very different magnitudes, an outlier channel, an all-zero row (padding-like)
    x = (
        rng.normal(size=(3, 5, K)).astype(np.float32)
        * np.array([0.01, 1.0, 300.0], np.float32)[:, None, None]
    )
    x[1, :, 7] *= 40
    x[2, 4] = 0
    got = session.run(None, {"x": x})[0]
    expected = numpy_int8(x.astype(np.float64), weight.astype(np.float64)) + (0 if bias is None else bias)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    # and it is close to the fp32 product it replaces (int8 loses a little, not a lot)
    exact = x[:2] @ weight + (0 if bias is None else bias)
    cosine = (got[:2] * exact).sum(-1) / (np.linalg.norm(got[:2], axis=-1) * np.linalg.norm(exact, axis=-1))
    assert cosine.min() > 0.99


def test_a_row_does_not_depend_on_its_batch():
    rng = np.random.default_rng(0)
    model = one_matmul(rng.normal(size=(K, N)).astype(np.float32), 21)
    name_nodes(model)
    session = ort.InferenceSession(
        quantize_matmuls(model, weight_matmuls(model)).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    row = rng.normal(size=(1, 1, K)).astype(np.float32)
    alone = session.run(None, {"x": row})[0][0, 0]
    batch = rng.normal(size=(2, 3, K)).astype(np.float32) * 100
    batch[1, 2] = row[0, 0]
    assert np.array_equal(session.run(None, {"x": batch})[0][1, 2], alone)


@pytest.mark.parametrize("saturates", [False, True])
def test_signed_int8_weights_on_a_saturating_cpu_are_one_warning_line(
    tmp_path, monkeypatch, caplog, saturates
):
    """An int8 directory quantized on a VNNI machine, served on one without: one clear line."""
    from embedding_server.models.files import QUANTIZATION_REPORT, ModelFiles
    from embedding_server.quantize import cache

    model = one_matmul(np.ones((K, N), np.float32), 21)
    name_nodes(model)
    onnx.save(quantize_matmuls(model, weight_matmuls(model), signed_weights=True), tmp_path / "model.onnx")
    (tmp_path / QUANTIZATION_REPORT).write_text("{}")
    monkeypatch.setattr(cache, "signed_weights_exact", lambda: not saturates)  # the CPU's property
    files = ModelFiles(root=tmp_path, onnx=tmp_path / "model.onnx")
    with caplog.at_level("WARNING", logger="embedding_server.quantize"):
        assert cache.int8_files("m", files) == files  # served as it is
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == int(saturates)
    assert all("int8 weights are signed" in w and "quantize it again" in w for w in warnings)
