"""Real XLM-RoBERTa encoder graphs with random weights, shaped like the jina-v3 and bge-m3 exports.

tests.support.synthetic's toy backbones keep only what the server can observe
(names, dtypes, layout); they have no attention, so neither the attention
rewrite (embedding_server.models.attention) nor a benchmark's memory and time
can be judged on them. These graphs are the real architecture, written with the
plain ONNX ops torch.onnx emits for Hugging Face's XLM-R (opset 17, no fused
contrib ops): post-LN encoder layers, erf GELU, ``Softmax(Q·Kᵀ·scale + mask)·V``
attention. jina-v3 adds rotary position embeddings (rotate-half, base 20000, no
absolute positions) and a task LoRA on every linear, picked by ``task_id``;
bge-m3 has XLM-R's absolute positions (ids derived from the non-pad tokens) and
float16 sparse/ColBERT heads in torch zip files.

``tiny_shape()`` builds a graph in milliseconds for unit tests; ``FULL_SHAPE`` is
the published size (24 layers, hidden 1024, vocab 250002: ~570M parameters,
~2.2 GB float32) for benchmarks, built once into the cache by ``full_size_dir``.
Weights are streamed into the external data file as they are drawn, so a full
build holds one tensor at a time (the 1 GB word table at most), never the
model twice, and never serializes a >2 GB protobuf. ``xlmr_forward`` is the
same network in plain numpy, for tests' expectations.

    python -m tests.support.xlmr build jina-v3|bge-m3 [--out DIR | --cache DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from embedding_server.cache_dir import default_cache_dir
from onnx import TensorProto, helper, numpy_helper

from tests.support.synthetic import (
    EXTERNAL_THRESHOLD,
    JINA_ADAPTERS,
    JINA_INSTRUCTIONS,
    OPSET,
    PAD_ID,
    Linear,
    float_output,
    ids_input,
    vocab_size,
    write_json,
    write_tokenizer,
)
from tests.support.torch_zip import save_state_dict

JINA_V3, BGE_M3 = "jina-v3", "bge-m3"  # as embedding_server.models.family names them
FAMILIES = (JINA_V3, BGE_M3)
#: Bump when a built graph or its weights change: full-size caches are keyed by it.
BUILDER_VERSION = 1
LAYER_NORM_EPS = 1e-5
ROTARY_BASE = 20000.0
MASK_FILL = -10000.0
MATRYOSHKA = (32, 64, 128, 256, 512, 768, 1024)
DATA_FILE = "model.onnx_data"
BAAI_CONSTANT_FILE = "Constant_7_attr__value"
COMPLETE_MARKER = ".complete"
STALE_BUILD_S = 3600  # a temporary build directory this old was left by a killed build
_PAGE = 4096  # large external tensors start on a page, so ONNX Runtime can map them
_LARGE = 1 << 16  # bytes; smaller ones are only 64-byte aligned (tiny graphs stay tiny)


@dataclass(frozen=True)
class XlmrShape:
    """The sizes of an XLM-R encoder; ``positions`` = max tokens + 2 (XLM-R's position offset)."""

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    positions: int
    lora_rank: int = 4

    def __post_init__(self) -> None:
        assert self.hidden % self.heads == 0, "hidden must split evenly into heads"
        assert self.head_dim % 2 == 0, "rotary embeddings rotate pairs: head_dim must be even"
        assert self.vocab > PAD_ID and self.positions > 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def max_tokens(self) -> int:
        return self.positions - 2


FULL_SHAPE = XlmrShape(layers=24, hidden=1024, heads=16, ffn=4096, vocab=250002, positions=8194)


def tiny_shape(max_tokens: int = 32) -> XlmrShape:
    """Two layers of width 32 over synthetic.py's tokenizer vocabulary: 30k-47k weights, built in ms."""
    return XlmrShape(layers=2, hidden=32, heads=4, ffn=64, vocab=vocab_size(), positions=max_tokens + 2)


# --- weights -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dense:
    """A linear layer in MatMul's layout: ``y = x @ weight + bias (+ (x @ lora_a[t]) @ lora_b[t])``."""

    weight: np.ndarray  # [in, out] (torch's weight.T)
    bias: np.ndarray  # [out]
    lora_a: np.ndarray | None = None  # [tasks, in, rank] (jina-v3)
    lora_b: np.ndarray | None = None  # [tasks, rank, out]


@dataclass(frozen=True)
class Norm:
    weight: np.ndarray  # gamma [H]
    bias: np.ndarray  # beta [H]


@dataclass(frozen=True)
class Layer:
    query: Dense
    key: Dense
    value: Dense
    attention_out: Dense
    attention_norm: Norm
    ffn_in: Dense
    ffn_out: Dense
    ffn_norm: Norm


@dataclass(frozen=True)
class XlmrWeights:
    """Every float32 array of one model, as stored in its ONNX file (heads as float16 values)."""

    family: str
    shape: XlmrShape
    word: np.ndarray  # [V,H]
    position: np.ndarray | None  # [P,H]; bge-m3 only (jina-v3 is rotary)
    token_type: np.ndarray  # [1,H]: XLM-R's single token type, added to every token
    embedding_norm: Norm
    layers: tuple[Layer, ...]
    sparse: Linear | None = None  # bge-m3: Linear(H -> 1), float16 values
    colbert: Linear | None = None  # bge-m3: Linear(H -> H), float16 values


@dataclass(frozen=True)
class Param:
    """How one tensor is drawn: ``mean + std * N(0, 1)``; ``half``: rounded to float16 values."""

    shape: tuple[int, ...]
    std: float
    mean: float = 0.0
    half: bool = False


#: Per layer: each linear's parameter prefix (Hugging Face's names) and its in/out widths.
_LINEARS = (
    ("attention.self.query", "h", "h"),
    ("attention.self.key", "h", "h"),
    ("attention.self.value", "h", "h"),
    ("attention.output.dense", "h", "h"),
    ("intermediate.dense", "h", "f"),
    ("output.dense", "f", "h"),
)
_NORMS = ("attention.output.LayerNorm", "output.LayerNorm")
_WORD = "embeddings.word_embeddings.weight"
_POSITION = "embeddings.position_embeddings.weight"
_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"
_EMBED_NORM = "embeddings.LayerNorm"
_RESIDUAL_OUTPUTS = ("attention.output.dense", "output.dense")
_NOISE = 0.002


def param_specs(family: str, shape: XlmrShape) -> dict[str, Param]:
    """Every tensor of the model by name, in graph order.

    Word and position embeddings are N(0, 0.02) as Hugging Face initializes them.
    Linear weights are N(0, 1/fan_in) (0.031 at width 1024, near HF's 0.02) so that
    at tiny widths too the attention logits have unit scale and softmax is not
    uniform; the two residual-branch outputs (attention output, FFN output) are
    further scaled by 1/sqrt(2 * layers), GPT-2's init. Without that, random
    post-LN layers average every token into one vector: measured on full-size
    jina-v3, the mean cosine between the 16 token states of one input was 0.999 after 12
    layers and 1.000 after 24 (with it: 0.11 and 0.16). Biases, LayerNorm betas
    and the token-type row (shared by every token) are near 0 and gammas near 1,
    with 0.002-0.005 noise: shared terms as large as the word vectors would
    make all tokens alike too. LoRA deltas are a quarter of the base linear's
    scale so that every task visibly changes the output.
    """
    _check_family(family)
    h, f, r = shape.hidden, shape.ffn, shape.lora_rank
    tasks = len(JINA_ADAPTERS)
    width = {"h": h, "f": f}
    branch = 1.0 / math.sqrt(2 * shape.layers)
    specs: dict[str, Param] = {_WORD: Param((shape.vocab, h), 0.02)}
    if family == BGE_M3:
        specs[_POSITION] = Param((shape.positions, h), 0.02)
    specs[_TOKEN_TYPE] = Param((1, h), 0.005)
    specs[f"{_EMBED_NORM}.weight"] = Param((h,), _NOISE, 1.0)
    specs[f"{_EMBED_NORM}.bias"] = Param((h,), _NOISE)
    for i in range(shape.layers):
        for prefix, n_in, n_out in _LINEARS:
            name, fan_in, fan_out = f"encoder.layer.{i}.{prefix}", width[n_in], width[n_out]
            scale = branch if prefix in _RESIDUAL_OUTPUTS else 1.0
            specs[f"{name}.weight"] = Param((fan_in, fan_out), scale / math.sqrt(fan_in))
            specs[f"{name}.bias"] = Param((fan_out,), _NOISE)
            if family == JINA_V3:
                specs[f"{name}.lora_A"] = Param((tasks, fan_in, r), 1.0 / math.sqrt(fan_in))
                specs[f"{name}.lora_B"] = Param((tasks, r, fan_out), scale * 0.25 / math.sqrt(r))
        for prefix in _NORMS:
            specs[f"encoder.layer.{i}.{prefix}.weight"] = Param((h,), _NOISE, 1.0)
            specs[f"encoder.layer.{i}.{prefix}.bias"] = Param((h,), _NOISE)
    if family == BGE_M3:  # torch layout [out, in]; written to .pt files, not to the graph
        specs["sparse_linear.weight"] = Param((1, h), 1.0 / math.sqrt(h), half=True)
        specs["sparse_linear.bias"] = Param((1,), 0.0, 0.1, half=True)  # most tokens get a weight
        specs["colbert_linear.weight"] = Param((h, h), 1.0 / math.sqrt(h), half=True)
        specs["colbert_linear.bias"] = Param((h,), 0.02, half=True)
    return specs


def draw(name: str, spec: Param, seed: int) -> np.ndarray:
    """One tensor, from a generator keyed by (seed, name): any tensor can be drawn alone, in any order."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    array = rng.standard_normal(spec.shape, dtype=np.float32)  # float32 directly: no 2x float64 copy
    array *= np.float32(spec.std)
    if spec.mean:
        array += np.float32(spec.mean)
    if spec.half:
        array = array.astype(np.float16).astype(np.float32)
    return array


def weights_from_arrays(family: str, shape: XlmrShape, arrays: Mapping[str, np.ndarray]) -> XlmrWeights:
    """The named tensors of ``param_specs`` assembled into an ``XlmrWeights``."""

    def dense(name: str) -> Dense:
        return Dense(
            arrays[f"{name}.weight"],
            arrays[f"{name}.bias"],
            arrays.get(f"{name}.lora_A"),
            arrays.get(f"{name}.lora_B"),
        )

    def norm(name: str) -> Norm:
        return Norm(arrays[f"{name}.weight"], arrays[f"{name}.bias"])

    layers = []
    for i in range(shape.layers):
        p = f"encoder.layer.{i}"
        layers.append(
            Layer(
                query=dense(f"{p}.attention.self.query"),
                key=dense(f"{p}.attention.self.key"),
                value=dense(f"{p}.attention.self.value"),
                attention_out=dense(f"{p}.attention.output.dense"),
                attention_norm=norm(f"{p}.attention.output.LayerNorm"),
                ffn_in=dense(f"{p}.intermediate.dense"),
                ffn_out=dense(f"{p}.output.dense"),
                ffn_norm=norm(f"{p}.output.LayerNorm"),
            )
        )
    heads = {}
    if family == BGE_M3:
        heads = {
            name: Linear(arrays[f"{name}_linear.weight"], arrays[f"{name}_linear.bias"])
            for name in ("sparse", "colbert")
        }
    return XlmrWeights(
        family=family,
        shape=shape,
        word=arrays[_WORD],
        position=arrays.get(_POSITION),
        token_type=arrays[_TOKEN_TYPE],
        embedding_norm=norm(_EMBED_NORM),
        layers=tuple(layers),
        **heads,
    )


def make_weights(family: str, shape: XlmrShape, seed: int) -> XlmrWeights:
    """All weights in memory (the arrays a directory built with the same seed stores)."""
    arrays = {name: draw(name, spec, seed) for name, spec in param_specs(family, shape).items()}
    return weights_from_arrays(family, shape, arrays)


def parameter_count(family: str, shape: XlmrShape) -> int:
    """Parameters of the ONNX graph (the .pt heads excluded)."""
    specs = param_specs(family, shape)
    return sum(math.prod(s.shape) for name, s in specs.items() if not s.half)


# --- the graph ------------------------------------------------------------------------------------


class XlmrGraph:
    """Named nodes over onnx.helper; weights go straight to the external data file.

    ``weight`` writes an array's bytes into ``model.onnx_data`` at an aligned
    offset (a page, for large ones) and keeps only a reference in the graph, so the model proto stays a few
    hundred kilobytes whatever the model's size. Small constants (shapes, axes,
    scalars) stay inline: ONNX Runtime's shape inference and the attention
    rewrite read them from the graph.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._inline: dict[str, np.ndarray] = {}
        self._names: set[str] = set()
        directory.mkdir(parents=True, exist_ok=True)
        self._data: BinaryIO = open(directory / DATA_FILE, "wb")  # noqa: SIM115  # closed by close()

    def close(self) -> None:
        self._data.close()

    def const(self, name: str, array: np.ndarray) -> str:
        """An inline initializer; one name asked twice with equal values is one tensor."""
        array = np.asarray(array)
        if name in self._inline:
            assert np.array_equal(self._inline[name], array), f"two different constants named {name}"
            return name
        self._claim(name)
        self._inline[name] = array
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer stored in the external data file (inline if smaller than synthetic's threshold)."""
        if array.nbytes < EXTERNAL_THRESHOLD:
            return self.const(name, array)
        self._claim(name)
        self.initializers.append(_write_external(self._data, DATA_FILE, name, array))
        return name

    def constant_node(self, name: str, output: str, array: np.ndarray, location: str) -> str:
        """A ``Constant`` node whose tensor lives in its own external file (BAAI's export has one)."""
        self._claim(output)
        with open(self.directory / location, "wb") as handle:
            tensor = _write_external(handle, location, f"{name}_attr__value", array)
        self.nodes.append(helper.make_node("Constant", [], [output], name=name, value=tensor))
        return output

    def op(self, op_type: str, *inputs: str, name: str, **attrs: Any) -> str:
        """One node; ``name`` is both the node's name and its (single) output's."""
        self._claim(name)
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], name=name, **attrs))
        return name

    def _claim(self, name: str) -> None:
        assert name not in self._names, f"two values named {name}"
        self._names.add(name)

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "xlm-roberta", inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests.support.xlmr"
        )
        model.ir_version = 8
        return model


def _write_external(handle: BinaryIO, location: str, name: str, array: np.ndarray) -> onnx.TensorProto:
    """Append ``array`` (little-endian, C order) at an aligned offset; the TensorProto referring to it."""
    array = np.asarray(array, dtype=array.dtype.newbyteorder("<"), order="C")
    align = _PAGE if array.nbytes >= _LARGE else 64
    offset = -(-handle.tell() // align) * align
    handle.write(b"\0" * (offset - handle.tell()))
    handle.write(array.data)  # no bytes copy of a 1 GB table
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", array.nbytes)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


Source = Callable[[str], np.ndarray]  # a tensor by parameter name


class _Encoder:
    """Writes the XLM-R graph into an XlmrGraph, pulling each weight from ``source`` when it is needed."""

    def __init__(self, g: XlmrGraph, family: str, shape: XlmrShape, source: Source) -> None:
        self.g, self.family, self.shape, self.source = g, family, shape, source
        self.jina = family == JINA_V3

    def weight(self, name: str) -> str:
        return self.g.weight(name, self.source(name))

    def build(self) -> str:
        """Token states [B,S,H] from ``input_ids``, ``attention_mask`` (and jina-v3's ``task_id``)."""
        g, s = self.g, self.shape
        x = self.embeddings()
        # The additive mask, once for every layer: (1 - mask) * -10000 as [B,1,1,S].
        mask = g.op(
            "Unsqueeze",
            "attention_mask",
            g.const("const/axes_1_2", np.array([1, 2], np.int64)),
            name="attention_mask/unsqueeze",
        )
        mask = g.op("Cast", mask, to=TensorProto.FLOAT, name="attention_mask/cast")
        mask = g.op(
            "Sub", g.const("const/one", np.array(1.0, np.float32)), mask, name="attention_mask/invert"
        )
        self.mask = g.op(
            "Mul",
            mask,
            g.const("const/mask_fill", np.array(MASK_FILL, np.float32)),
            name="attention_mask/extended",
        )
        if self.jina:
            self.rotary_tables()
        self.split = g.const("const/split_heads", np.array([0, 0, s.heads, s.head_dim], np.int64))
        self.merge = g.const("const/merge_heads", np.array([0, 0, s.hidden], np.int64))
        self.scale = g.const("const/attention_scale", np.array(1.0 / math.sqrt(s.head_dim), np.float32))
        for i in range(s.layers):
            x = self.layer(i, x)
        return x

    def embeddings(self) -> str:
        g = self.g
        x = g.op("Gather", self.weight(_WORD), "input_ids", name="embeddings/word")
        if not self.jina:  # XLM-R position ids: cumsum over non-pad ids, pad tokens at pad_id
            pad = g.const("const/pad_id", np.array(PAD_ID, np.int64))
            not_pad = g.op("Equal", "input_ids", pad, name="embeddings/position_ids/is_pad")
            not_pad = g.op("Not", not_pad, name="embeddings/position_ids/not_pad")
            not_pad = g.op("Cast", not_pad, to=TensorProto.INT64, name="embeddings/position_ids/not_pad_int")
            count = g.op(
                "CumSum",
                not_pad,
                g.const("const/axis_1", np.array(1, np.int64)),
                name="embeddings/position_ids/cumsum",
            )
            count = g.op("Mul", count, not_pad, name="embeddings/position_ids/mul")
            ids = g.op("Add", count, pad, name="embeddings/position_ids")
            positions = g.op("Gather", self.weight(_POSITION), ids, name="embeddings/position")
            x = g.op("Add", x, positions, name="embeddings/add_position")
        if self.jina:
            token_type = self.weight(_TOKEN_TYPE)
        else:  # BAAI's export keeps one tensor as a Constant node with its own external file
            token_type = g.constant_node(
                "Constant_7", "embeddings/token_type_constant", self.source(_TOKEN_TYPE), BAAI_CONSTANT_FILE
            )
        x = g.op("Add", x, token_type, name="embeddings/add_token_type")
        return self.layer_norm(x, _EMBED_NORM, "embeddings/layer_norm")

    def rotary_tables(self) -> None:
        """cos/sin [S,D] for positions 0..S-1 of this run (rotate-half layout: frequencies twice)."""
        g, d = self.g, self.shape.head_dim
        shape = g.op("Shape", "input_ids", name="rotary/shape")
        length = g.op(
            "Gather",
            shape,
            g.const("const/index_1", np.array(1, np.int64)),
            axis=0,
            name="rotary/sequence_length",
        )
        positions = g.op(
            "Range",
            g.const("const/zero_i", np.array(0, np.int64)),
            length,
            g.const("const/one_i", np.array(1, np.int64)),
            name="rotary/positions",
        )
        positions = g.op("Cast", positions, to=TensorProto.FLOAT, name="rotary/positions_float")
        positions = g.op(
            "Unsqueeze",
            positions,
            g.const("const/axes_1", np.array([1], np.int64)),
            name="rotary/positions_column",
        )
        freqs = g.op("Mul", positions, g.const("const/inv_freq", inverse_frequencies(d)), name="rotary/freqs")
        angles = g.op("Concat", freqs, freqs, axis=-1, name="rotary/angles")
        self.cos = g.op("Cos", angles, name="rotary/cos")
        self.sin = g.op("Sin", angles, name="rotary/sin")
        half = d // 2
        self.halves = (
            g.const("const/rotary_start_0", np.array([0], np.int64)),
            g.const("const/rotary_half", np.array([half], np.int64)),
            g.const("const/rotary_end", np.array([d], np.int64)),
            g.const("const/axes_last", np.array([-1], np.int64)),
        )

    def rotate(self, t: str, prefix: str) -> str:
        """``t * cos + rotate_half(t) * sin`` on [B,N,S,D], rotate_half(t) = [-t2, t1]."""
        g = self.g
        start, half, end, axes = self.halves
        first = g.op("Slice", t, start, half, axes, name=f"{prefix}/rotary/first_half")
        second = g.op("Slice", t, half, end, axes, name=f"{prefix}/rotary/second_half")
        negated = g.op("Neg", second, name=f"{prefix}/rotary/neg")
        rotated = g.op("Concat", negated, first, axis=-1, name=f"{prefix}/rotary/rotate_half")
        cos = g.op("Mul", t, self.cos, name=f"{prefix}/rotary/mul_cos")
        sin = g.op("Mul", rotated, self.sin, name=f"{prefix}/rotary/mul_sin")
        return g.op("Add", cos, sin, name=f"{prefix}/rotary")

    def linear(self, x: str, param: str, prefix: str) -> str:
        """``Add(MatMul(x, W), b)``; jina-v3 adds the task's LoRA term to it:
        ``MatMul(MatMul(x, Gather(A, task_id)), Gather(B, task_id))``."""
        g = self.g
        y = g.op("MatMul", x, self.weight(f"{param}.weight"), name=f"{prefix}/matmul")
        y = g.op("Add", y, self.weight(f"{param}.bias"), name=f"{prefix}/bias")
        if self.jina:
            a = g.op("Gather", self.weight(f"{param}.lora_A"), "task_id", name=f"{prefix}/lora/a")
            b = g.op("Gather", self.weight(f"{param}.lora_B"), "task_id", name=f"{prefix}/lora/b")
            low = g.op("MatMul", x, a, name=f"{prefix}/lora/down")
            delta = g.op("MatMul", low, b, name=f"{prefix}/lora/up")
            y = g.op("Add", y, delta, name=f"{prefix}/lora/add")
        return y

    def layer_norm(self, x: str, param: str, name: str) -> str:
        return self.g.op(
            "LayerNormalization",
            x,
            self.weight(f"{param}.weight"),
            self.weight(f"{param}.bias"),
            axis=-1,
            epsilon=LAYER_NORM_EPS,
            name=name,
        )

    def heads(self, x: str, prefix: str) -> str:
        """[B,S,H] -> [B,N,S,D]."""
        split = self.g.op("Reshape", x, self.split, name=f"{prefix}/reshape")
        return self.g.op("Transpose", split, perm=[0, 2, 1, 3], name=f"{prefix}/transpose")

    def layer(self, i: int, x: str) -> str:
        g, p, at = self.g, f"encoder.layer.{i}", f"layer{i}/attention"
        q = self.heads(self.linear(x, f"{p}.attention.self.query", f"{at}/q"), f"{at}/q")
        k = self.heads(self.linear(x, f"{p}.attention.self.key", f"{at}/k"), f"{at}/k")
        v = self.heads(self.linear(x, f"{p}.attention.self.value", f"{at}/v"), f"{at}/v")
        if self.jina:
            q, k = self.rotate(q, f"{at}/q"), self.rotate(k, f"{at}/k")
        kt = g.op("Transpose", k, perm=[0, 1, 3, 2], name=f"{at}/k/transpose_t")
        scores = g.op("MatMul", q, kt, name=f"{at}/scores")
        scores = g.op("Mul", scores, self.scale, name=f"{at}/scaled")
        scores = g.op("Add", scores, self.mask, name=f"{at}/masked")
        probs = g.op("Softmax", scores, axis=-1, name=f"{at}/softmax")
        context = g.op("MatMul", probs, v, name=f"{at}/context")
        context = g.op("Transpose", context, perm=[0, 2, 1, 3], name=f"{at}/context/transpose")
        context = g.op("Reshape", context, self.merge, name=f"{at}/context/reshape")
        out = self.linear(context, f"{p}.attention.output.dense", f"{at}/output")
        out = g.op("Add", out, x, name=f"{at}/output/residual")
        x = self.layer_norm(out, f"{p}.attention.output.LayerNorm", f"{at}/output/layer_norm")
        ffn = f"layer{i}/ffn"
        h = self.linear(x, f"{p}.intermediate.dense", f"{ffn}/in")
        h = self.gelu(h, f"{ffn}/gelu")
        out = self.linear(h, f"{p}.output.dense", f"{ffn}/out")
        out = g.op("Add", out, x, name=f"{ffn}/residual")
        return self.layer_norm(out, f"{p}.output.LayerNorm", f"{ffn}/layer_norm")

    def gelu(self, x: str, prefix: str) -> str:
        """``x * 0.5 * (1 + erf(x / sqrt(2)))`` as torch.onnx writes nn.GELU()."""
        g = self.g
        scaled = g.op(
            "Div", x, g.const("const/sqrt2", np.array(math.sqrt(2.0), np.float32)), name=f"{prefix}/div"
        )
        erf = g.op("Erf", scaled, name=f"{prefix}/erf")
        erf = g.op("Add", erf, g.const("const/one", np.array(1.0, np.float32)), name=f"{prefix}/add")
        product = g.op("Mul", x, erf, name=f"{prefix}/mul")
        return g.op("Mul", product, g.const("const/half", np.array(0.5, np.float32)), name=f"{prefix}/half")


def inverse_frequencies(head_dim: int) -> np.ndarray:
    """Rotary frequencies ``base^(-2i/D)`` for i < D/2, float32 (as the graph stores them)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    return (1.0 / ROTARY_BASE**exponents).astype(np.float32)


# --- directories ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class XlmrDir:
    """A built model directory; ``weights`` is None when built with ``keep_weights=False``."""

    path: Path
    family: str
    shape: XlmrShape
    seed: int
    weights: XlmrWeights | None

    @property
    def onnx_path(self) -> Path:
        return self.path / "onnx" / "model.onnx"


def make_jina_v3_xlmr(
    directory: Path, shape: XlmrShape, *, seed: int = 3, keep_weights: bool = True
) -> XlmrDir:
    """jina-embeddings-v3's layout (make_jina_v3's): ``onnx/model.onnx`` + ``onnx/model.onnx_data``,
    inputs ``input_ids``, ``attention_mask``, ``task_id`` (int64, rank 0), output ``text_embeds``."""
    return make_xlmr(JINA_V3, directory, shape, seed=seed, keep_weights=keep_weights)


def make_bge_m3_xlmr(
    directory: Path, shape: XlmrShape, *, seed: int = 5, keep_weights: bool = True
) -> XlmrDir:
    """BAAI's bge-m3 layout (make_bge_m3_baai's): ``onnx/model.onnx`` + ``model.onnx_data`` +
    ``Constant_7_attr__value``, outputs ``token_embeddings`` and ``sentence_embedding``; heads in
    ``sparse_linear.pt`` / ``colbert_linear.pt`` (float16 torch zip files)."""
    return make_xlmr(BGE_M3, directory, shape, seed=seed, keep_weights=keep_weights)


def make_xlmr(
    family: str, directory: Path, shape: XlmrShape, *, seed: int, keep_weights: bool = True
) -> XlmrDir:
    """Write a model directory of ``family``; each weight is drawn, written and (unless kept) dropped."""
    _check_family(family)
    specs = param_specs(family, shape)
    kept: dict[str, np.ndarray] = {}

    def source(name: str) -> np.ndarray:
        array = draw(name, specs[name], seed)
        if keep_weights:
            kept[name] = array
        return array

    onnx_dir = directory / "onnx"
    g = XlmrGraph(onnx_dir)
    try:
        states = _Encoder(g, family, shape, source).build()
    finally:
        g.close()
    h = shape.hidden
    if family == JINA_V3:
        g.op("Identity", states, name="text_embeds")
        inputs = [
            ids_input("input_ids"),
            ids_input("attention_mask"),
            helper.make_tensor_value_info("task_id", TensorProto.INT64, []),
        ]
        outputs = [float_output("text_embeds", ["batch_size", "sequence_length", h])]
    else:
        g.op("Identity", states, name="token_embeddings")
        cls = g.op(
            "Gather", states, g.const("const/zero_i", np.array(0, np.int64)), axis=1, name="pooler/cls"
        )
        g.op("LpNormalization", cls, axis=-1, p=2, name="sentence_embedding")
        inputs = [ids_input("input_ids"), ids_input("attention_mask")]
        outputs = [
            float_output("token_embeddings", ["batch_size", "sequence_length", h]),
            float_output("sentence_embedding", ["batch_size", h]),
        ]
        for head in ("sparse_linear", "colbert_linear"):
            state = {key: source(f"{head}.{key}").astype(np.float16) for key in ("weight", "bias")}
            save_state_dict(directory / f"{head}.pt", state)
    model = g.model(inputs, outputs)
    onnx.save_model(model, str(onnx_dir / "model.onnx"))  # weights are references: a small proto
    onnx.checker.check_model(str(onnx_dir / "model.onnx"))  # by path: reads external data headers only
    write_tokenizer(directory, shape.max_tokens)
    write_json(directory / "config.json", _config(family, shape))
    weights = weights_from_arrays(family, shape, kept) if keep_weights else None
    return XlmrDir(directory, family, shape, seed, weights)


def _config(family: str, shape: XlmrShape) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["XLMRobertaLoRA" if family == JINA_V3 else "XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "hidden_size": shape.hidden,
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "intermediate_size": shape.ffn,
        "hidden_act": "gelu",
        "max_position_embeddings": shape.positions,
        "vocab_size": shape.vocab,
        "type_vocab_size": 1,
        "pad_token_id": PAD_ID,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "layer_norm_eps": LAYER_NORM_EPS,
        "position_embedding_type": "rotary" if family == JINA_V3 else "absolute",
    }
    if family == JINA_V3:
        config.update(
            rotary_emb_base=ROTARY_BASE,
            lora_rank=shape.lora_rank,
            lora_adaptations=list(JINA_ADAPTERS),
            task_instructions=JINA_INSTRUCTIONS,
            matryoshka_dimensions=[d for d in MATRYOSHKA if d <= shape.hidden],
        )
    return config


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: expected one of {', '.join(FAMILIES)}")


def full_size_dir(family: str, cache: Path | None = None) -> Path:
    """The full-size model of ``family``, built once into
    ``<cache>/synthetic-full/<family>-v<BUILDER_VERSION>/`` (cache: the server's default cache dir,
    ``$XDG_CACHE_HOME/embedding-service``).

    Built in a temporary sibling and renamed into place when complete (with a marker file), so
    an interrupted or concurrent build never leaves a half-written model where readers look.
    """
    _check_family(family)
    root = (cache or default_cache_dir()) / "synthetic-full"
    target = root / f"{family}-v{BUILDER_VERSION}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    if target.exists():  # not from this builder's rename (it always has the marker): start again
        shutil.rmtree(target)
    for stale in root.glob(f".{family}-v*.*"):  # a build killed hours ago (one takes ~15 s)
        if time.time() - stale.stat().st_mtime > STALE_BUILD_S:
            shutil.rmtree(stale, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(dir=root, prefix=f".{family}-v{BUILDER_VERSION}."))
    temporary.chmod(0o755)  # mkdtemp's 0700 would follow the rename: the cache is shared
    try:
        make_xlmr(family, temporary, FULL_SHAPE, seed=_default_seed(family), keep_weights=False)
        (temporary / COMPLETE_MARKER).write_text(f"{family} {FULL_SHAPE}\n", encoding="utf-8")
        try:
            os.rename(temporary, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(temporary)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


def _default_seed(family: str) -> int:
    return 3 if family == JINA_V3 else 5


# --- numpy reference ------------------------------------------------------------------------------


def xlmr_forward(
    weights: XlmrWeights,
    family: str,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    task_id: int | None = None,
) -> np.ndarray:
    """The token states [B,S,H] (float64) the graph computes, in plain numpy from the same arrays."""
    assert family == weights.family, f"weights are {weights.family}'s, not {family}'s"
    s = weights.shape
    ids = np.asarray(input_ids, np.int64)
    mask = np.asarray(attention_mask, np.float64)
    batch, length = ids.shape
    if family == JINA_V3:
        assert task_id is not None, "jina-v3 needs a task_id"
    x = weights.word[ids].astype(np.float64)
    if weights.position is not None:
        not_pad = (ids != PAD_ID).astype(np.int64)
        x = x + weights.position[np.cumsum(not_pad, axis=1) * not_pad + PAD_ID]
    x = _layer_norm(x + weights.token_type[0], weights.embedding_norm)
    additive = ((1.0 - mask) * MASK_FILL)[:, None, None, :]  # [B,1,1,S]
    cos = sin = None
    if family == JINA_V3:
        angles = np.arange(length, dtype=np.float64)[:, None] * inverse_frequencies(s.head_dim)[None, :]
        angles = np.concatenate([angles, angles], axis=-1)
        cos, sin = np.cos(angles), np.sin(angles)

    def dense(v: np.ndarray, layer: Dense) -> np.ndarray:
        y = v @ layer.weight + layer.bias
        if layer.lora_a is not None and layer.lora_b is not None and task_id is not None:
            y = y + (v @ layer.lora_a[task_id]) @ layer.lora_b[task_id]
        return np.asarray(y, np.float64)

    def split(v: np.ndarray) -> np.ndarray:
        heads: np.ndarray = v.reshape(batch, length, s.heads, s.head_dim).transpose(0, 2, 1, 3)
        return heads

    def rotate(v: np.ndarray) -> np.ndarray:
        if cos is None or sin is None:
            return v
        half = s.head_dim // 2
        return np.asarray(v * cos + np.concatenate([-v[..., half:], v[..., :half]], axis=-1) * sin)

    for layer in weights.layers:
        q = rotate(split(dense(x, layer.query)))
        k = rotate(split(dense(x, layer.key)))
        v = split(dense(x, layer.value))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(s.head_dim) + additive
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, s.hidden)
        x = _layer_norm(dense(context, layer.attention_out) + x, layer.attention_norm)
        h = dense(x, layer.ffn_in)
        h = h * 0.5 * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _layer_norm(dense(h, layer.ffn_out) + x, layer.ffn_norm)
    return x


def _layer_norm(x: np.ndarray, norm: Norm) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return np.asarray((x - mean) / np.sqrt(variance + LAYER_NORM_EPS) * norm.weight + norm.bias)


_erf_ufunc = np.frompyfunc(math.erf, 1, 1)


def _erf(x: np.ndarray) -> np.ndarray:
    """erf elementwise (numpy has none and scipy is not a dependency): exact, fine at test sizes."""
    result: np.ndarray = np.asarray(_erf_ufunc(x), dtype=np.float64)
    return result


# --- CLI --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.xlmr", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a full-size model directory and print its path")
    build.add_argument("family", choices=FAMILIES)
    where = build.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="write the directory here (no cache, no marker)")
    where.add_argument("--cache", type=Path, help=f"cache root (default {default_cache_dir()})")
    build.add_argument("--seed", type=int, default=None, help="with --out: another draw of the weights")
    args = parser.parse_args(argv)
    if args.out is not None:
        seed = _default_seed(args.family) if args.seed is None else args.seed
        path = make_xlmr(args.family, args.out, FULL_SHAPE, seed=seed, keep_weights=False).path
    else:
        if args.seed is not None:
            parser.error("--seed needs --out (the cache holds the default seed's model)")
        path = full_size_dir(args.family, args.cache)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- what deploy/ gives the full-size models --------------------------------------------------------

LARGE_COMPOSE = Path(__file__).resolve().parents[2] / "docker" / "compose.large.yaml"


def deployed() -> tuple[int, list[str]]:
    """The memory limit (MiB) and the server flags after ``--model`` that docker/compose.large.yaml
    (and deploy/kubernetes/models/*, checked to agree) give a full-size model: what
    tests/test_full_size.py and bench/full_size.py run under."""
    import yaml

    (service,) = yaml.safe_load(LARGE_COMPOSE.read_text())["services"].values()
    memory = str(service["deploy"]["resources"]["limits"]["memory"])
    assert memory.endswith("g"), memory
    return int(memory[:-1]) * 1024, list(service["command"][2:])
