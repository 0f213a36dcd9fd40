"""The graph rewrite: MatMul(X, W) with constant W -> per-row int8 MatMulInteger.

For X [..., K] and W [K, N] (float32 initializer):

    s_x   = max(ReduceMax(X), -ReduceMin(X)) / 127        per row, [..., 1]
    X_q   = QuantizeLinear(X, s_x, 128, block_size=K)     uint8, zero point 128
    W_q   = int8(round(W / s_w)),  s_w = max(|W|, axis=0) / 127   per output column, [N]
    Y     = MatMulIntegerToFloat(X_q, W_q, s_x, s_w, 128)  (s_x [..., 1] broadcasts: no Mul after it)

Each row's result depends only on that row, so batching and padding cannot
change it. Other nodes are untouched. uint8 x int8 (U8S8) is MLAS's fast path
(VNNI): int8 x int8 measured 35x slower on this CPU. QuantizeLinear and
MatMulIntegerToFloat do in one pass each what Round/Add/Cast and Cast/Mul
did in several (measured: fewer passes over the activations is what makes
int8 pay here, the integer GEMM itself is ~10x faster than fp32).

A CPU without VNNI (AVX2 only, e.g. AMD EPYC Zen 2/3) runs U8S8 with
``vpmaddubsw``, which adds two u8 x s8 products into an int16 and saturates:
255 x 127 x 2 > 32767. Measured on an AMD EPYC (AVX2): the rewrite's output
was 12.7% off the integer scheme at its worst element. There the weights are
stored as uint8 with zero point 128 instead (the same integers, shifted), which
MLAS runs as U8U8 with int16-widened operands: exact. Which form a machine
needs is measured, not assumed from CPU flags: ``signed_weights_exact`` runs
one saturating product through ONNX Runtime and checks it.

On short sentences these passes are a third of the int8 run (ORT profile, batch
32 x ~20 tokens: Abs/ReduceMax/Div/QuantizeLinear/Mul 28%, the integer GEMMs
25%), so each one counts: the row maximum is read by ReduceMax and ReduceMin
(no |X| tensor written), and from opset 21 on, a blocked QuantizeLinear with one
block per row (``block_size=K``, scale [..., 1]) divides and rounds in one pass
where older opsets need Div then QuantizeLinear (measured in-process on short
sentences: 1.30x fp32 before, 1.60x with both; bench/quantize_results.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ACTIVATION_LEVELS = 127.0
MIN_SCALE = 1e-12
MS_DOMAIN = "com.microsoft"
#: From this opset QuantizeLinear takes a per-row (blocked) scale: one op instead of Div + QuantizeLinear.
BLOCKED_QUANTIZE_OPSET = 21
#: Embedding tables smaller than this (elements) stay fp32: position tables, token types.
TABLE_MIN_SIZE = 4096


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a stable name (``<op>_<index>``): kept-fp32 lists name nodes."""
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant float32 matrix, in graph order."""
    weights = {
        init.name: init
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2
    }
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_weight(weight: np.ndarray, signed: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-column int8: (W_q [K,N], s_w float32 [N]); W_q int8, or (``signed``
    False) the same integers + 128 as uint8, to go with zero point 128."""
    scale = np.maximum(np.abs(weight).max(axis=0), MIN_SCALE) / ACTIVATION_LEVELS
    quantized = np.clip(np.round(weight / scale), -127, 127)
    stored = quantized.astype(np.int8) if signed else (quantized + 128).astype(np.uint8)
    return stored, scale.astype(np.float32)


@cache
def signed_weights_exact() -> bool:
    """Whether this machine's ONNX Runtime multiplies uint8 activations by int8 weights exactly.

    One MatMulInteger whose every pair of products (255 x 127, twice) overflows an int16: a
    kernel that saturates (AVX2 without VNNI) returns less than the true sum.
    """
    k, n = 64, 16
    a = np.full((4, k), 255, np.uint8)
    b = np.full((k, n), 127, np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, n])],
        [numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"a": a})
    return bool((got == 255 * 127 * k).all())


def has_signed_weights(model: onnx.ModelProto) -> bool:
    """Whether any int8 MatMul of ``model`` (graph only: external data need not be loaded) has int8
    weights, the form a saturating kernel gets wrong."""
    types = {init.name: init.data_type for init in model.graph.initializer}
    return any(
        node.op_type == "MatMulIntegerToFloat" and types.get(node.input[1]) == TensorProto.INT8
        for node in model.graph.node
    )


def smoothing_factors(
    model: onnx.ModelProto, activation_max: dict[str, np.ndarray], alpha: float
) -> dict[str, np.ndarray]:
    """SmoothQuant: per input channel j, s_j = max|X_j|^a / max|W_j|^(1-a); X/s and s*W quantize better.

    ``activation_max``: each weight MatMul's input, max |value| per channel over the calibration texts.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    factors = {}
    for node in model.graph.node:
        if node.name in activation_max and node.input[1] in initializers:
            w_max = np.abs(numpy_helper.to_array(initializers[node.input[1]])).max(axis=1)
            x_max = activation_max[node.name]
            scale = np.power(np.maximum(x_max, 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
            factors[node.name] = np.clip(scale, 1e-3, 1e3).astype(np.float32)
    return factors


def quantize_matmuls(
    model: onnx.ModelProto,
    names: Iterable[str],
    smoothing: dict[str, np.ndarray] | None = None,
    signed_weights: bool | None = None,
) -> onnx.ModelProto:
    """A copy of ``model`` with the named weight MatMuls rewritten to per-row int8 (see module doc).

    ``smoothing``: per-MatMul input-channel factors (smoothing_factors); X is divided by them
    (one more pass over X) and W multiplied, before both are quantized. ``signed_weights``:
    int8 weights (None: where ``signed_weights_exact``), else uint8 with zero point 128.
    """
    if signed_weights is None:
        signed_weights = signed_weights_exact()
    model = _copy(model)
    chosen = set(names)
    initializers = {init.name: init for init in model.graph.initializer}
    opset = opset_of(model)
    shared = {
        "q/zero_point": numpy_helper.from_array(np.array(128, np.uint8), "q/zero_point"),
        "q/one": numpy_helper.from_array(np.array(1.0, np.float32), "q/one"),
        "q/min_scale": numpy_helper.from_array(np.array(MIN_SCALE, np.float32), "q/min_scale"),
        "q/inv_levels": numpy_helper.from_array(
            np.array(1.0 / ACTIVATION_LEVELS, np.float32), "q/inv_levels"
        ),
        "q/last_axis": numpy_helper.from_array(np.array([-1], np.int64), "q/last_axis"),
    }
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    used_weights: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.name not in chosen or node.input[1] not in initializers:
            new_nodes.append(node)
            continue
        x, w_name, out, p = node.input[0], node.input[1], node.output[0], node.name
        used_weights[w_name] = used_weights.get(w_name, 0) + 1
        weight = numpy_helper.to_array(initializers[w_name]).astype(np.float32)
        factor = (smoothing or {}).get(p)
        if factor is not None:
            weight = weight * factor[:, None]
            new_inits.append(numpy_helper.from_array((1.0 / factor).astype(np.float32), f"{p}/smooth"))
            new_nodes.append(
                helper.make_node("Mul", [x, f"{p}/smooth"], [f"{p}/x_smooth"], name=f"{p}/Smooth")
            )
            x = f"{p}/x_smooth"
        w_q, w_scale = quantize_weight(weight, signed_weights)
        new_inits += [
            numpy_helper.from_array(w_q, f"{p}/W_q"),
            numpy_helper.from_array(w_scale, f"{p}/w_scale"),
        ]
        reduce_inputs = [x] + (["q/last_axis"] if opset >= 18 else [])
        reduce_attrs = {"keepdims": 1} if opset >= 18 else {"keepdims": 1, "axes": [-1]}
        new_nodes += [
            # max |X| per row without writing |X|: two reads instead of a write and a read
            helper.make_node(
                "ReduceMax", reduce_inputs, [f"{p}/rmax"], name=f"{p}/ReduceMax", **reduce_attrs
            ),
            helper.make_node(
                "ReduceMin", reduce_inputs, [f"{p}/rmin"], name=f"{p}/ReduceMin", **reduce_attrs
            ),
            helper.make_node("Neg", [f"{p}/rmin"], [f"{p}/neg_rmin"], name=f"{p}/Neg"),
            helper.make_node(
                "Max", [f"{p}/rmax", f"{p}/neg_rmin", "q/min_scale"], [f"{p}/amax_safe"], name=f"{p}/Max"
            ),
            helper.make_node("Mul", [f"{p}/amax_safe", "q/inv_levels"], [f"{p}/x_scale"], name=f"{p}/Scale"),
            *quantize_rows(x, f"{p}/x_scale", f"{p}/x_q", p, int(weight.shape[0]), opset),
            # int32 GEMM, * s_x per row * s_w per column, in one contrib op (its a_scale broadcasts;
            # its bias input does not combine with a per-row a_scale in ORT 1.32: wrong sums, so the
            # bias Add stays a node)
            helper.make_node(
                "MatMulIntegerToFloat",
                [f"{p}/x_q", f"{p}/W_q", f"{p}/x_scale", f"{p}/w_scale", "q/zero_point"]
                + ([] if signed_weights else ["q/zero_point"]),
                [out],
                name=f"{p}/MatMulIntegerToFloat",
                domain=MS_DOMAIN,
            ),
        ]
    if not used_weights:
        return model
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    still_used = {name for node in new_nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in still_used]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + new_inits + list(shared.values()))
    return model


def quantize_rows(x: str, scale: str, out: str, p: str, columns: int, opset: int) -> list[onnx.NodeProto]:
    """X [..., K] -> uint8 round(X / scale) + 128, saturated; ``scale`` [..., 1] (one per row)."""
    if opset < BLOCKED_QUANTIZE_OPSET:  # per-tensor QuantizeLinear only: divide first
        return [
            helper.make_node("Div", [x, scale], [f"{p}/x_scaled"], name=f"{p}/Div"),
            helper.make_node(
                "QuantizeLinear", [f"{p}/x_scaled", "q/one", "q/zero_point"], [out], name=f"{p}/Quantize"
            ),
        ]
    # blocked: the zero point has the scale's shape, [..., 1] of 128 (tiny, made per run)
    return [
        helper.make_node("Shape", [scale], [f"{p}/scale_shape"], name=f"{p}/ScaleShape"),
        helper.make_node(
            "Expand", ["q/zero_point", f"{p}/scale_shape"], [f"{p}/zero_points"], name=f"{p}/ZeroPoints"
        ),
        helper.make_node(
            "QuantizeLinear",
            [x, scale, f"{p}/zero_points"],
            [out],
            name=f"{p}/Quantize",
            axis=-1,
            block_size=columns,
        ),
    ]


def quantize_tables(model: onnx.ModelProto, min_size: int = TABLE_MIN_SIZE) -> list[str]:
    """Embedding tables (Gather rows of a float matrix) to int8 in place, one scale per row.

    Gather(T, ids) -> Cast(Gather(T_q, ids)) * Gather(s, ids): exact per token, so batch
    independent too. On real jina-v3 / bge-m3 the 250k-token table is ~1 GB of the 2.3 GB,
    so without this int8 would shrink them ~1.7x instead of ~4x. Returns the tables' names.
    """
    tables = {
        init.name: init
        for init in model.graph.initializer
        if init.data_type == TensorProto.FLOAT and len(init.dims) == 2 and np.prod(init.dims) >= min_size
    }
    gathers = [
        n
        for n in model.graph.node
        if n.op_type == "Gather"
        and n.input[0] in tables
        and all(a.i == 0 for a in n.attribute if a.name == "axis")
    ]
    if not gathers:
        return []
    new_nodes: list[onnx.NodeProto] = []
    done: set[str] = set()
    for node in model.graph.node:
        if node not in gathers:
            new_nodes.append(node)
            continue
        table, ids, out, p = node.input[0], node.input[1], node.output[0], node.name
        if table not in done:
            values = numpy_helper.to_array(tables[table]).astype(np.float32)
            scale = np.maximum(np.abs(values).max(axis=1, keepdims=True), MIN_SCALE) / ACTIVATION_LEVELS
            quantized = np.clip(np.round(values / scale), -127, 127).astype(np.int8)
            model.graph.initializer.append(numpy_helper.from_array(quantized, f"{table}/q"))
            model.graph.initializer.append(
                numpy_helper.from_array(scale.astype(np.float32), f"{table}/row_scale")
            )
            done.add(table)
        new_nodes += [
            helper.make_node("Gather", [f"{table}/q", ids], [f"{p}/rows_q"], name=f"{p}/GatherQ"),
            helper.make_node(
                "Cast", [f"{p}/rows_q"], [f"{p}/rows_f"], name=f"{p}/CastF", to=TensorProto.FLOAT
            ),
            helper.make_node("Gather", [f"{table}/row_scale", ids], [f"{p}/scales"], name=f"{p}/GatherScale"),
            helper.make_node("Mul", [f"{p}/rows_f", f"{p}/scales"], [out], name=f"{p}/Dequantize"),
        ]
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    still_used = {name for node in new_nodes for name in node.input}
    kept = [init for init in model.graph.initializer if init.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return sorted(done)


def matmul_inputs(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, str]:
    """MatMul name -> the name of its activation input (to expose as a graph output for calibration)."""
    chosen = set(names)
    return {n.name: n.input[0] for n in model.graph.node if n.name in chosen}


def with_outputs(model: onnx.ModelProto, values: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the given intermediate values."""
    copy = _copy(model)
    present = {o.name for o in copy.graph.output}
    for value in dict.fromkeys(values):
        if value not in present:
            copy.graph.output.append(helper.make_empty_tensor_value_info(value))
    return copy


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
