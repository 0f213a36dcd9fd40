"""Bounded attention on ONNX Runtime: plain MatMul/Softmax attention becomes a fused kernel.

A Hugging Face export computes attention as ``Softmax(Q·Kᵀ·scale + mask)·V``
in plain ops, and ONNX Runtime runs that as written: one run holds the scores
of every head at once, ``B x heads x T x T`` floats, twice or more (the
product, the masked copy, the softmax). For one 8192-token window of an
XLM-R large model (16 heads) that is 4 GiB a copy, four times the default
memory limit. Measured on one attention layer of that shape (hidden 1024,
2 threads, AMD EPYC, bench-free script in the closing note of issue 23): at
4096 tokens the plain ops grew the process by 2065 MiB in 2.64 s; ONNX
Runtime's ``com.microsoft.MultiHeadAttention`` without a mask runs its CPU
flash-attention kernel (blocks of queries and keys sized to the L2 cache)
and grew it by 112 MiB in 1.06 s. With a key padding mask the same op
falls back to materializing the scores (+1152 MiB).

So each attention core that matches the pattern is replaced by an ``If`` on
"no input of this run has padding" (the attention mask is all ones): then the
flash kernel, else the original ops, unchanged. A run of one sequence (how a
long window runs: the memory budget cuts padded batches of long inputs) never
has padding; a padded batch of short inputs computes exactly as before.

The rewrite touches only the graph: weights stay in their external files and
the session reads them from the model's directory. ``fuse_attention`` returns
how many cores it replaced; the session pool checks the rewritten graph
against itself (a padded run takes the original ops, an unpadded one the
kernel) before serving it, so an export whose additive term is not only the
padding mask (a relative position bias, say) falls back to the plain graph.
OpenVINO needs none of this: its CPU plugin fuses the same pattern into its
own blocked attention (measured +308 MiB for two 4096-token sequences, one
half padding), so only ONNX Runtime's sessions are rewritten.
"""

from __future__ import annotations

import mmap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .base import SessionSignature

MS_DOMAIN = "com.microsoft"
#: Elementwise ops allowed between the scores' MatMul and the Softmax (scale and additive mask).
_CHAIN_OPS = ("Add", "Mul", "Div")
MASK_INPUT = "attention_mask"


@dataclass(frozen=True)
class _Core:
    """One attention core: ``MatMul(q, kt) → chain → Softmax → MatMul(·, v)``."""

    matmul_qk: onnx.NodeProto
    chain: list[onnx.NodeProto]  # from the MatMul towards the Softmax
    softmax: onnx.NodeProto
    matmul_pv: onnx.NodeProto
    scale: float
    heads: int

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return [self.matmul_qk, *self.chain, self.softmax, self.matmul_pv]


def _scalar(name: str, constants: dict[str, np.ndarray]) -> float | None:
    value = constants.get(name)
    return float(value.reshape(())) if value is not None and value.size == 1 else None


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Inline initializers and Constant nodes small enough to read (external weights are not)."""
    found: dict[str, np.ndarray] = {}
    for tensor in graph.initializer:
        if tensor.data_location != TensorProto.EXTERNAL and np.prod(tensor.dims, dtype=np.int64) <= 16:
            found[tensor.name] = numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            if tensor.data_location != TensorProto.EXTERNAL and np.prod(tensor.dims, dtype=np.int64) <= 16:
                found[node.output[0]] = numpy_helper.to_array(tensor)
    return found


def _shapes(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Value types from ONNX shape inference on the graph alone (weights' dims are in the proto)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # an exotic export that inference rejects: no rewrite, not a load failure
        return {}
    values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {value.name: value.type for value in values}


def _heads_of(q: str, types: dict[str, onnx.TypeProto]) -> int | None:
    """N of a float32 ``[B, N, T, D]`` query, when inference knows it."""
    tensor = types.get(q)
    if tensor is None or tensor.tensor_type.elem_type != TensorProto.FLOAT:
        return None
    dims = tensor.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value"):
        return None
    return int(dims[1].dim_value)


def _find_cores(model: onnx.ModelProto) -> list[_Core]:
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {value.name for value in graph.output}
    constants = _constants(graph)
    types = _shapes(model)

    def sole_use(name: str) -> bool:
        return len(consumers[name]) == 1 and name not in outputs

    def reaches_matmul(name: str) -> bool:
        """Whether ``name`` is a MatMul's output, through scalar scalings: the scores, not a mask."""
        while (node := producer.get(name)) is not None:
            if node.op_type == "MatMul":
                return True
            sides = [value for value in node.input if value not in constants]
            if node.op_type not in ("Mul", "Div") or len(sides) != 1:
                return False
            name = sides[0]
        return False

    cores = []
    for softmax in (node for node in graph.node if node.op_type == "Softmax"):
        axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
        if axis not in (-1, 3) or not sole_use(softmax.output[0]):
            continue
        matmul_pv = consumers[softmax.output[0]][0]
        if matmul_pv.op_type != "MatMul" or matmul_pv.input[0] != softmax.output[0]:
            continue
        chain: list[onnx.NodeProto] = []
        scale, masked, current = 1.0, False, softmax.input[0]
        while (step := producer.get(current)) is not None and sole_use(current):
            sides = [name for name in step.input if name not in constants]
            fixed = [name for name in step.input if name in constants]
            factor = _scalar(fixed[0], constants) if len(fixed) == 1 and len(sides) == 1 else None
            if step.op_type == "Mul" and factor is not None:
                scale, current = scale * factor, sides[0]
            elif step.op_type == "Div" and factor is not None and step.input[0] == sides[0]:
                scale, current = scale / factor, sides[0]
            elif step.op_type == "Add" and len(sides) == 2 and not masked:
                scores = [name for name in sides if reaches_matmul(name)]
                if len(scores) != 1:
                    break
                masked, current = True, scores[0]  # the other side is the additive mask
            else:
                break
            chain.insert(0, step)
        matmul_qk = producer.get(current)
        if matmul_qk is None or matmul_qk.op_type != "MatMul" or not sole_use(current):
            continue
        heads = _heads_of(matmul_qk.input[0], types)
        if heads is None or _heads_of(matmul_pv.input[1], types) != heads:
            continue
        cores.append(_Core(matmul_qk, chain, softmax, matmul_pv, scale, heads))
    return cores


def fuse_attention(model: onnx.ModelProto, mask_input: str = MASK_INPUT) -> int:
    """Replace every matching attention core of ``model`` in place (see the module doc); the count."""
    graph = model.graph
    if mask_input not in {value.name for value in graph.input}:
        return 0
    cores = _find_cores(model)
    if not cores:
        return 0
    unpadded = "attention/unpadded"
    graph.node.append(  # int64 whatever the export's mask type: the comparison below is int64
        helper.make_node(
            "Cast", [mask_input], ["attention/mask"], name="attention/mask", to=TensorProto.INT64
        )
    )
    graph.node.append(
        helper.make_node(
            "ReduceMin", ["attention/mask"], ["attention/mask_min"], name="attention/mask_min", keepdims=0
        )
    )
    graph.node.append(
        helper.make_node(
            "Equal",
            ["attention/mask_min", "attention/one"],
            [unpadded],
            name="attention/unpadded",
        )
    )
    graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "attention/one"))
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), "attention/to_btd"))
    for index, core in enumerate(cores):
        _replace(graph, core, unpadded, f"attention{index}")
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _topological_sort(graph)
    return len(cores)


def _replace(graph: onnx.GraphProto, core: _Core, condition: str, prefix: str) -> None:
    """``If(condition)``: then the flash kernel on [B,T,N·D] views of q, k, v; else the core's own nodes."""
    q, kt, v = core.matmul_qk.input[0], core.matmul_qk.input[1], core.matmul_pv.input[1]
    out = core.matmul_pv.output[0]
    n = f"{prefix}/fused"
    graph.initializer.append(
        numpy_helper.from_array(np.array([0, 0, core.heads, -1], np.int64), f"{n}/heads_shape")
    )
    fused = [
        helper.make_node("Transpose", [q], [f"{n}/q_bsnd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{n}/q_bsnd", "attention/to_btd"], [f"{n}/q"]),
        helper.make_node("Transpose", [kt], [f"{n}/k_bsnd"], perm=[0, 3, 1, 2]),
        helper.make_node("Reshape", [f"{n}/k_bsnd", "attention/to_btd"], [f"{n}/k"]),
        helper.make_node("Transpose", [v], [f"{n}/v_bsnd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{n}/v_bsnd", "attention/to_btd"], [f"{n}/v"]),
        helper.make_node(
            "MultiHeadAttention",
            [f"{n}/q", f"{n}/k", f"{n}/v"],
            [f"{n}/context"],
            name=f"{n}/MultiHeadAttention",
            domain=MS_DOMAIN,
            num_heads=core.heads,
            scale=core.scale,
        ),
        helper.make_node("Reshape", [f"{n}/context", f"{n}/heads_shape"], [f"{n}/context_bsnd"]),
        helper.make_node("Transpose", [f"{n}/context_bsnd"], [f"{n}/out"], perm=[0, 2, 1, 3]),
    ]
    plain = [onnx.NodeProto() for _ in core.nodes]
    for copy, node in zip(plain, core.nodes, strict=True):
        copy.CopyFrom(node)
    plain[-1].output[0] = f"{prefix}/plain/out"
    then_branch = helper.make_graph(
        fused, f"{n}", [], [helper.make_tensor_value_info(f"{n}/out", TensorProto.FLOAT, None)]
    )
    else_branch = helper.make_graph(
        plain,
        f"{prefix}/plain",
        [],
        [helper.make_tensor_value_info(f"{prefix}/plain/out", TensorProto.FLOAT, None)],
    )
    doomed = {node.output[0] for node in core.nodes}  # by output: protobuf wrappers have no identity
    kept = [node for node in graph.node if node.output[0] not in doomed]
    del graph.node[:]
    graph.node.extend(kept)
    graph.node.append(
        helper.make_node(
            "If",
            [condition],
            [out],
            name=f"{prefix}/if_unpadded",
            then_branch=then_branch,
            else_branch=else_branch,
        )
    )


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Order nodes so each follows its inputs' producers (the Ifs were appended at the end)."""
    available = {value.name for value in graph.input} | {tensor.name for tensor in graph.initializer}
    available.add("")
    outer = _outer_inputs
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = []
        for node in pending:
            if all(name in available for name in outer(node)):
                ordered.append(node)
                available.update(node.output)
            else:
                progressed.append(node)
        if len(progressed) == len(pending):
            raise ValueError("attention rewrite: the graph has a cycle or an undefined input")
        pending = progressed
    del graph.node[:]
    graph.node.extend(ordered)


def _outer_inputs(node: onnx.NodeProto) -> list[str]:
    """A node's inputs, and for an If the outer values its branches read."""
    names = list(node.input)
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            inner = {out for sub in attribute.g.node for out in sub.output}
            inner |= {tensor.name for tensor in attribute.g.initializer}
            names += [name for sub in attribute.g.node for name in sub.input if name and name not in inner]
    return names


def fused_graph(path: Path) -> tuple[bytes, int] | None:
    """The serialized graph of ``path`` with its attention fused, and the count; None if none matched.

    The weights are not read (they stay external, or inline in a small file); a file
    ONNX cannot parse is left to the session to report.
    """
    try:
        with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"Softmax") < 0:  # no plain attention: no parse (the built-in model's
                return None  # 90 MB graph took 0.3-0.7 s to parse, on every open)
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # whatever is wrong with it, opening it as it is says so, naming the file
        return None
    count = fuse_attention(model)
    return (model.SerializeToString(), count) if count else None


#: Tokens of the check's sequences; ids from 4 up are ordinary tokens of any XLM-R or BERT vocabulary.
_CHECK_LENGTH = 8
_CHECK_TOLERANCE = 1e-3


def disagreement(session: Any, signature: SessionSignature) -> str | None:
    """Why the fused graph cannot serve (in words), or None: a sequence run alone (the kernel) must
    give what it gives beside a padded one (the original ops)."""
    ids = np.array([[0, *range(4, 4 + _CHECK_LENGTH - 2), 2]], np.int64)
    short = np.array([[0, 4, 5, 2] + [1] * (_CHECK_LENGTH - 4)], np.int64)
    mask = np.array([[1] * 4 + [0] * (_CHECK_LENGTH - 4)], np.int64)
    alone = session.run(None, _feeds(signature, ids, np.ones_like(ids)))
    padded = session.run(
        None, _feeds(signature, np.concatenate([ids, short]), np.concatenate([np.ones_like(ids), mask]))
    )
    names = list(signature.outputs)
    for name, one, two in zip(names, alone, padded, strict=True):
        one, two = np.asarray(one), np.asarray(two)
        if one.dtype.kind != "f" or one.ndim == 0 or two.shape[:1] != (2,):
            continue
        error = float(np.abs(one[0].astype(np.float32) - two[0].astype(np.float32)).max())
        scale = float(np.abs(two[0].astype(np.float32)).max()) or 1.0
        if not error <= _CHECK_TOLERANCE * scale:
            return (
                f"output {name} differs by {error:.3g} (of {scale:.3g}) between the kernel and the plain ops"
            )
    return None


def _feeds(signature: SessionSignature, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for any encoder signature: ids, mask, zero token types, task 0."""
    feeds = {}
    for name, shape in signature.inputs.items():
        if name == MASK_INPUT:
            feeds[name] = mask
        elif len(shape) == 2:
            feeds[name] = ids if name == "input_ids" else np.zeros_like(ids)
        else:
            feeds[name] = np.zeros([1] * len(shape), np.int64)
    return feeds
