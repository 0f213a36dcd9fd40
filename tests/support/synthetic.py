"""Tiny synthetic model directories with the real exports' layout, names and dtypes.

Real jina-v3 and bge-m3 weights are gigabytes; these directories keep only
what the server can observe: the file layout (``onnx/model.onnx`` + external
data, or ``model.onnx`` at the top), the ONNX input/output names, dtypes and
ranks, the config files, and an XLM-R-style tokenizer (``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, Metaspace, offsets).

Every graph is a small "backbone" whose token states depend on the token,
its XLM-R position (real tokens from pad_id+1 = 2, padding at 1), the task
(jina-v3: ``task_id`` picks a LoRA-like delta), and the other tokens of the
sequence under the attention mask (a masked mean mixed back in, then tanh).
The mean is divided by the number of non-pad *ids*, the way position ids are
derived from ids in XLM-R, so padding with the wrong id changes every number.
``tests.support.reference`` recomputes all of it in numpy from the same
arrays, without ONNX.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BGE_M3_HEADS = FIXTURES / "bge_m3_heads"

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
OPSET = 17
EXTERNAL_THRESHOLD = 64  # bytes: every weight matrix goes external, shape constants stay inline

JINA_HIDDEN = 32
JINA_MAX_TOKENS = 64
JINA_MATRYOSHKA = (8, 16, 32)
JINA_ADAPTERS = ("retrieval.query", "retrieval.passage", "separation", "classification", "text-matching")
JINA_INSTRUCTIONS = {
    "retrieval.query": "Represent the query for retrieving evidence documents: ",
    "retrieval.passage": "Represent the document for retrieval: ",
    "separation": "",
    "classification": "",
    "text-matching": "",
}

BGE_M3_HIDDEN = 24  # must match tests/fixtures/make_bge_m3_heads.py
BGE_M3_MAX_TOKENS = 48  # from tokenizer_config.json (BAAI layout)
BGE_M3_AAPOT_POSITIONS = 42  # no tokenizer_config: max tokens = 42 - 2

ST_HIDDEN = 16
ST_MAX_TOKENS = 32

_WORD_TEXT = """
the a an of to in on at for with and or but not is was are were be been it its this that these those
there here he she they we you i my your our their his her them us cat cats dog dogs bird mat sat sits
house garden tree trees river city town road car train book books page pages word words text texts
document documents query queries passage search retrieval evidence retrieving represent Represent
model models vector vectors embedding embeddings token tokens chunk chunks late long short small big
red green blue old new good bad happy sad quick brown fox jumps over lazy bark barks loudly quietly
runs ran walk walked sun moon star rain snow wind day night morning evening water fire stone paris
london berlin france germany capital country people language languages english german french music
song songs play played game games number numbers one two three four five six seven eight nine ten
what who where when why how which can could will would should may might must do does did has have had
The It A In This We They She He What How Where
"""
WORDS = _WORD_TEXT.split()
_SUBWORD_TEXT = "ing ed er est ly s es tion ment ness able un re pre post"
SUBWORDS = _SUBWORD_TEXT.split()
CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()"


# --- tokenizer -------------------------------------------------------------------


def tokenizer_vocabulary() -> list[tuple[str, float]]:
    """Unigram pieces and log-probabilities: whole words beat sub-words beat characters."""
    vocab: list[tuple[str, float]] = [(token, 0.0) for token in SPECIAL_TOKENS]
    seen = set(SPECIAL_TOKENS)

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    add("▁", -6.0)
    for word in WORDS:
        add("▁" + word, -5.0)
    for piece in SUBWORDS:
        add(piece, -6.0)
    for char in CHARACTERS:
        add(char, -8.0)
        add("▁" + char, -8.5)
    return vocab


def build_tokenizer() -> Tokenizer:
    """An XLM-R-shaped tokenizer: Unigram + Metaspace, ``<s> $A </s>``."""
    tokenizer = Tokenizer(models.Unigram(tokenizer_vocabulary(), unk_id=UNK_ID, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
    )
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    # A file's own padding/truncation must be ignored by the server (models.md):
    # set misleading ones, as the MiniLM tokenizer.json does.
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token="<pad>", length=20)
    tokenizer.enable_truncation(max_length=12)
    return tokenizer


def vocab_size() -> int:
    return len(tokenizer_vocabulary())


# --- weights -----------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """The numpy weights of a synthetic encoder (float32, as stored in the ONNX file)."""

    tokens: np.ndarray  # [V,H]
    positions: np.ndarray  # [P,H]; row 1 is padding's, real tokens start at row 2
    w_token: np.ndarray  # [H,H]
    w_context: np.ndarray  # [H,H]
    bias: np.ndarray  # [H]
    task_deltas: np.ndarray | None = None  # [tasks,H,H] (jina-v3)
    token_types: np.ndarray | None = None  # [2,H] (sentence-transformers)

    @property
    def hidden(self) -> int:
        return int(self.tokens.shape[1])


def make_backbone(
    hidden: int, positions: int, seed: int, tasks: int = 0, token_types: bool = False
) -> Backbone:
    rng = np.random.default_rng(seed)

    def normal(scale: float, *shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return Backbone(
        tokens=normal(0.8, vocab_size(), hidden),
        positions=normal(0.3, positions, hidden),
        w_token=normal(1.0 / np.sqrt(hidden), hidden, hidden),
        w_context=normal(1.5 / np.sqrt(hidden), hidden, hidden),
        bias=normal(0.1, hidden),
        task_deltas=normal(0.6 / np.sqrt(hidden), tasks, hidden, hidden) if tasks else None,
        token_types=normal(0.3, 2, hidden) if token_types else None,
    )


@dataclass(frozen=True)
class Linear:
    """A torch nn.Linear's weights: y = x @ weight.T + bias."""

    weight: np.ndarray  # [out, in]
    bias: np.ndarray  # [out]


def bge_m3_head(name: str) -> Linear:
    """A head fixture as float32 holding exactly the stored float16 values."""
    weight = np.load(BGE_M3_HEADS / f"{name}.weight.npy")
    bias = np.load(BGE_M3_HEADS / f"{name}.bias.npy")
    assert weight.dtype == np.float16 and bias.dtype == np.float16
    return Linear(weight.astype(np.float32), bias.astype(np.float32))


# --- ONNX graph building -------------------------------------------------------------


class GraphBuilder:
    """A thin layer over onnx.helper that names intermediate values."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[str, np.ndarray] = {}
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer; asking twice for one name with equal values reuses it."""
        array = np.asarray(array)
        if name in self._constants:
            assert np.array_equal(self._constants[name], array), f"two different constants named {name}"
            return name
        self._constants[name] = array
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, name: str | None = None, **attrs: object) -> str:
        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [out], name=f"{op_type}_{self._count}", **attrs)
        )
        return out

    def backbone(
        self, weights: Backbone, task_id: str | None = None, token_type_ids: str | None = None
    ) -> str:
        """Token states [B,T,H] from ``input_ids`` and ``attention_mask`` (see module doc)."""
        pad = self.const("pad_id", np.array(PAD_ID, np.int64))
        not_pad = self.op("Cast", self.op("Not", self.op("Equal", "input_ids", pad)), to=TensorProto.INT64)
        cumulative = self.op("CumSum", not_pad, self.const("axis_1", np.array(1, np.int64)))
        position_ids = self.op("Add", self.op("Mul", cumulative, not_pad), pad)  # XLM-R position ids
        x = self.op(
            "Add",
            self.op("Gather", self.const("token_table", weights.tokens), "input_ids"),
            self.op("Gather", self.const("position_table", weights.positions), position_ids),
        )
        if token_type_ids is not None:
            assert weights.token_types is not None
            x = self.op(
                "Add", x, self.op("Gather", self.const("type_table", weights.token_types), token_type_ids)
            )
        if task_id is not None:
            assert weights.task_deltas is not None
            delta = self.op("Gather", self.const("lora_deltas", weights.task_deltas), task_id)
            x = self.op("Add", x, self.op("MatMul", x, delta))  # [H,H] or [1,H,H]: broadcasts
        mask = self.op(
            "Unsqueeze",
            self.op("Cast", "attention_mask", to=TensorProto.FLOAT),
            self.const("axes_2", np.array([2], np.int64)),
        )
        axes_1 = self.const("axes_1", np.array([1], np.int64))
        summed = self.op("ReduceSum", self.op("Mul", x, mask), axes_1, keepdims=1)  # [B,1,H]
        count = self.op(
            "ReduceSum", self.op("Cast", not_pad, to=TensorProto.FLOAT), axes_1, keepdims=1
        )  # [B,1]
        count = self.op("Max", count, self.const("one", np.array(1.0, np.float32)))
        context = self.op("Div", summed, self.op("Unsqueeze", count, "axes_2"))
        mixed = self.op(
            "Add",
            self.op("MatMul", x, self.const("w_token", weights.w_token)),
            self.op("MatMul", context, self.const("w_context", weights.w_context)),
        )
        return self.op("Tanh", self.op("Add", mixed, self.bias_constant(weights.bias)))

    def bias_constant(self, bias: np.ndarray) -> str:
        """The bias as an initializer (overridden by the BAAI layout as a Constant node)."""
        return self.const("bias", bias)

    def cls(self, states: str) -> str:
        """states[:, 0] -> [B,H]."""
        return self.op("Gather", states, self.const("zero", np.array(0, np.int64)), axis=1)

    def linear(self, x: str, head: Linear, prefix: str) -> str:
        weight_t = self.const(f"{prefix}_weight_t", np.ascontiguousarray(head.weight.T))
        return self.op("Add", self.op("MatMul", x, weight_t), self.const(f"{prefix}_bias", head.bias))

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "synthetic", inputs, outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="synthetic"
        )
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


class BaaiGraphBuilder(GraphBuilder):
    """BAAI's bge-m3 export keeps one weight as a Constant node in its own external file."""

    def bias_constant(self, bias: np.ndarray) -> str:
        tensor = numpy_helper.from_array(bias, "Constant_7_attr__value")
        self.nodes.append(helper.make_node("Constant", [], ["constant_7"], name="Constant_7", value=tensor))
        return "constant_7"


def ids_input(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["batch_size", "sequence_length"])


def float_output(name: str, shape: list[object], dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


# --- writing directories ----------------------------------------------------------------


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def write_tokenizer(directory: Path, model_max_length: int | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(directory / "tokenizer.json"))
    if model_max_length is not None:
        write_json(
            directory / "tokenizer_config.json",
            {
                "tokenizer_class": "XLMRobertaTokenizer",
                "model_max_length": model_max_length,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
            },
        )


def save_external(model: onnx.ModelProto, path: Path, data_file: str = "model.onnx_data") -> None:
    """Save the weights in ``data_file`` beside the graph (as the hub exports do).

    Tiny int64 shape constants (Reduce axes) stay inline: ONNX Runtime's shape
    inference cannot read them from an external file (real exports keep them
    inline too).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=EXTERNAL_THRESHOLD,
        convert_attribute=False,
    )


@dataclass(frozen=True)
class JinaV3Dir:
    path: Path
    weights: Backbone
    task_id_rank: int
    float16_output: bool


def make_jina_v3(
    directory: Path,
    *,
    task_id_rank: int = 0,
    float16_output: bool = False,
    extra_output: bool = False,
    layout: str = "onnx",
    seed: int = 3,
    max_tokens: int = JINA_MAX_TOKENS,
) -> JinaV3Dir:
    """jina-embeddings-v3's layout: ``onnx/model.onnx`` + ``onnx/model.onnx_data``.

    ``task_id`` is rank 0 (the official export) or ``[1]``; ``float16_output``
    casts ``text_embeds`` to float16; ``extra_output`` adds a pooled output
    listed *before* ``text_embeds`` (the server must fetch by name); ``max_tokens``
    sets the window (a small one makes long late-chunked documents cheap to test).
    """
    positions = max_tokens + 2
    weights = make_backbone(JINA_HIDDEN, positions, seed, tasks=len(JINA_ADAPTERS))
    g = GraphBuilder()
    states = g.backbone(weights, task_id="task_id")
    outputs = []
    if extra_output:
        g.op("ReduceMean", states, axes=[1], keepdims=0, name="pooler_output")
        outputs.append(float_output("pooler_output", ["batch_size", JINA_HIDDEN]))
    if float16_output:
        g.op("Cast", states, to=TensorProto.FLOAT16, name="text_embeds")
        outputs.append(
            float_output("text_embeds", ["batch_size", "sequence_length", JINA_HIDDEN], TensorProto.FLOAT16)
        )
    else:
        g.op("Identity", states, name="text_embeds")
        outputs.append(float_output("text_embeds", ["batch_size", "sequence_length", JINA_HIDDEN]))
    task_shape: list[object] = [] if task_id_rank == 0 else [1]
    inputs = [
        ids_input("input_ids"),
        ids_input("attention_mask"),
        helper.make_tensor_value_info("task_id", TensorProto.INT64, task_shape),
    ]
    onnx_path = directory / ("onnx/model.onnx" if layout == "onnx" else "model.onnx")
    save_external(g.model(inputs, outputs), onnx_path)
    write_tokenizer(directory, max_tokens)
    write_json(
        directory / "config.json",
        {
            "architectures": ["XLMRobertaLoRA"],
            "model_type": "xlm-roberta",
            "hidden_size": JINA_HIDDEN,
            "max_position_embeddings": positions,
            "pad_token_id": PAD_ID,
            "lora_adaptations": list(JINA_ADAPTERS),
            "task_instructions": JINA_INSTRUCTIONS,
            "matryoshka_dimensions": list(JINA_MATRYOSHKA),
        },
    )
    return JinaV3Dir(directory, weights, task_id_rank, float16_output)


@dataclass(frozen=True)
class BgeM3Dir:
    path: Path
    weights: Backbone
    sparse: Linear
    colbert: Linear
    export: str  # "baai" | "aapot"
    max_tokens: int


def bge_m3_config(positions: int) -> dict[str, object]:
    return {
        "architectures": ["XLMRobertaModel"],
        "model_type": "xlm-roberta",
        "hidden_size": BGE_M3_HIDDEN,
        "max_position_embeddings": positions,
        "pad_token_id": PAD_ID,
    }


def make_bge_m3_baai(directory: Path, seed: int = 5) -> BgeM3Dir:
    """BAAI's export: backbone-only ``onnx/model.onnx`` + ``model.onnx_data`` +
    ``Constant_7_attr__value``; heads in ``sparse_linear.pt`` / ``colbert_linear.pt``."""
    positions = BGE_M3_MAX_TOKENS + 2
    weights = make_backbone(BGE_M3_HIDDEN, positions, seed)
    g = BaaiGraphBuilder()
    states = g.backbone(weights)
    g.op("Identity", states, name="token_embeddings")
    g.op("LpNormalization", g.cls(states), axis=-1, p=2, name="sentence_embedding")
    model = g.model(
        [ids_input("input_ids"), ids_input("attention_mask")],
        [
            float_output("token_embeddings", ["batch_size", "sequence_length", BGE_M3_HIDDEN]),
            float_output("sentence_embedding", ["batch_size", BGE_M3_HIDDEN]),
        ],
    )
    onnx.external_data_helper.convert_model_to_external_data(
        model,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=EXTERNAL_THRESHOLD,
        convert_attribute=False,
    )
    for node in model.graph.node:  # the Constant's tensor goes to its own file, as in BAAI's export
        if node.name == "Constant_7":
            onnx.external_data_helper.set_external_data(node.attribute[0].t, "Constant_7_attr__value")
    onnx_path = directory / "onnx" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(onnx_path))
    for name in ("sparse_linear", "colbert_linear"):
        (directory / f"{name}.pt").write_bytes((BGE_M3_HEADS / f"{name}.pt").read_bytes())
    write_tokenizer(directory, BGE_M3_MAX_TOKENS)
    write_json(directory / "config.json", bge_m3_config(positions))
    return BgeM3Dir(
        directory,
        weights,
        bge_m3_head("sparse_linear"),
        bge_m3_head("colbert_linear"),
        "baai",
        BGE_M3_MAX_TOKENS,
    )


def make_bge_m3_aapot(directory: Path, seed: int = 7) -> BgeM3Dir:
    """aapot/bge-m3-onnx: top-level ``model.onnx`` with ``dense_vecs``, ``sparse_vecs``,
    ``colbert_vecs`` (heads inside the graph, no .pt files), no tokenizer_config.json."""
    weights = make_backbone(BGE_M3_HIDDEN, BGE_M3_AAPOT_POSITIONS, seed)
    sparse, colbert = bge_m3_head("sparse_linear"), bge_m3_head("colbert_linear")
    g = GraphBuilder()
    states = g.backbone(weights)
    g.op("LpNormalization", g.cls(states), axis=-1, p=2, name="dense_vecs")
    g.op("Relu", g.linear(states, sparse, "sparse"), name="sparse_vecs")
    one = g.const("one_i", np.array([1], np.int64))
    big = g.const("end_i", np.array([2**62], np.int64))
    rest = g.op("Slice", states, one, big, one)  # states[:, 1:]
    mask = g.op("Cast", g.op("Slice", "attention_mask", one, big, one), to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", mask, g.const("axes_2", np.array([2], np.int64)))
    g.op("Mul", g.linear(rest, colbert, "colbert"), mask, name="colbert_vecs")
    model = g.model(
        [ids_input("input_ids"), ids_input("attention_mask")],
        [
            float_output("dense_vecs", ["batch_size", BGE_M3_HIDDEN]),
            float_output("sparse_vecs", ["batch_size", "sequence_length", 1]),
            float_output("colbert_vecs", ["batch_size", "sequence_length_minus_1", BGE_M3_HIDDEN]),
        ],
    )
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(directory / "model.onnx"))
    write_tokenizer(directory, None)
    write_json(directory / "config.json", bge_m3_config(BGE_M3_AAPOT_POSITIONS))
    return BgeM3Dir(directory, weights, sparse, colbert, "aapot", BGE_M3_AAPOT_POSITIONS - 2)


@dataclass(frozen=True)
class SentenceTransformersDir:
    path: Path
    weights: Backbone
    pooling: str  # "cls" | "mean"
    normalize: bool
    prompts: dict[str, str] | None = None


def make_sentence_transformers(
    directory: Path,
    *,
    pooling: str = "cls",
    normalize: bool = False,
    layout: str = "top",
    seed: int = 11,
    prompts: dict[str, str] | None = None,
    default_prompt_name: str | None = None,
) -> SentenceTransformersDir:
    """A BERT-like sentence-transformers export: ``token_type_ids`` input, ``last_hidden_state``.

    ``prompts`` (e.g. ``{"query": "query: "}``) go to config_sentence_transformers.json.
    """
    weights = make_backbone(ST_HIDDEN, ST_MAX_TOKENS + 2, seed, token_types=True)
    g = GraphBuilder()
    g.op("Identity", g.backbone(weights, token_type_ids="token_type_ids"), name="last_hidden_state")
    model = g.model(
        [ids_input("input_ids"), ids_input("attention_mask"), ids_input("token_type_ids")],
        [float_output("last_hidden_state", ["batch_size", "sequence_length", ST_HIDDEN])],
    )
    onnx_path = directory / ("model.onnx" if layout == "top" else "onnx/model.onnx")
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(onnx_path))
    write_tokenizer(directory, None)
    write_json(
        directory / "config.json",
        {"model_type": "bert", "hidden_size": ST_HIDDEN, "max_position_embeddings": 512},
    )
    write_json(
        directory / "sentence_bert_config.json", {"max_seq_length": ST_MAX_TOKENS, "do_lower_case": False}
    )
    write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": ST_HIDDEN,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
        },
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    write_json(directory / "modules.json", modules)
    if prompts is not None:
        write_json(
            directory / "config_sentence_transformers.json",
            {"prompts": prompts, "default_prompt_name": default_prompt_name},
        )
    return SentenceTransformersDir(directory, weights, pooling, normalize, prompts)
