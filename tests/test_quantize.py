"""The fp32 build of the built-in model, int8 quantization and its fidelity gate.

Expectations are independent: the fp32 build against the numpy MiniLM of
tests/support/minilm_reference.py; int8 models against their fp32 source
served by a second real server. Tiny synthetic models of every family are
quantized here; the built-in model is quantized once (module fixture).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.models.build_minilm import REFERENCE_FILE, built_fp32_model
from embedding_server.quantize.calibration import default_texts
from embedding_server.quantize.cli import main as quantize_cli
from embedding_server.quantize.report import REPORT_JSON, REPORT_MD

from tests.support import minilm_reference as ref
from tests.support.server import RunningServer, start_server
from tests.support.synthetic import (
    make_bge_m3_aapot,
    make_bge_m3_baai,
    make_jina_v3,
    make_sentence_transformers,
)
from tests.support.texts import LONG_TEXT, SENTENCES

FLOOR_MIN, FLOOR_MEAN = 0.99, 0.995
CALIBRATION = 40  # texts: enough for every path, small for CI
MAKERS = {
    "st": lambda path: make_sentence_transformers(path, pooling="mean", normalize=True),
    "jina": make_jina_v3,
    "aapot": make_bge_m3_aapot,
    "baai": make_bge_m3_baai,
}
TASKS = {
    "retrieval.query": pb.TASK_RETRIEVAL_QUERY,
    "retrieval.passage": pb.TASK_RETRIEVAL_PASSAGE,
    "separation": pb.TASK_SEPARATION,
    "classification": pb.TASK_CLASSIFICATION,
    "text-matching": pb.TASK_TEXT_MATCHING,
}


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def mean_pooled(session: ort.InferenceSession, text: str) -> np.ndarray:
    ids = np.array([ref.tokenize(text).ids], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return session.run(["last_hidden_state"], feeds)[0][0].mean(0)


# --- the fp32 build ------------------------------------------------------------------------


def test_fp32_build_reproduces_the_numpy_reference(tmp_path: Path):
    path = built_fp32_model(ref.model_dir(), tmp_path)
    assert path.is_relative_to(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    texts = [*SENTENCES, "hi there", "naïve café 東京 " * 10]
    got = normalize(np.stack([mean_pooled(session, text) for text in texts]))
    cosines = (got * ref.embed(texts)).sum(-1)
    print(f"fp32 build vs numpy reference: min cosine {cosines.min():.7f}")
    assert cosines.min() >= 0.9999, cosines
    # Discriminative: each vector is closest to its own text's reference.
    assert ((got @ ref.embed(texts).T).argmax(1) == np.arange(len(texts))).all()
    # The second call finds the cached file and does not rebuild it.
    stamp = path.stat().st_mtime_ns
    assert built_fp32_model(ref.model_dir(), tmp_path) == path
    assert path.stat().st_mtime_ns == stamp


def test_shipped_build_check_vectors_are_the_numpy_reference():
    """The build-time check compares against vectors in the package; they must be the reference's."""
    shipped = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    expected = np.stack([ref.pooled([ref.tokenize(text).ids])[0] for text in shipped["texts"]])
    cosines = (normalize(np.array(shipped["vectors"])) * normalize(expected)).sum(-1)
    assert cosines.min() >= 0.999999


def test_fp32_build_works_when_the_cache_cannot_be_written(tmp_path: Path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    path = built_fp32_model(ref.model_dir(), blocked / "cache")  # mkdir fails: a temporary dir is used
    assert path.is_file() and not path.is_relative_to(tmp_path)


# --- embedding-quantize on every family ------------------------------------------------------


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(fp32 dir, int8 dir) per synthetic family, the int8 one written by embedding-quantize."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for name, make in MAKERS.items():
        make(root / name)
        assert quantize_cli([str(root / name), str(root / f"{name}-int8"), "--texts", str(CALIBRATION)]) == 0
        dirs[name] = (root / name, root / f"{name}-int8")
    return dirs


def report_of(directory: Path) -> dict:
    return json.loads((directory / REPORT_JSON).read_text(encoding="utf-8"))


def test_reports_are_written_for_every_family(family_dirs):
    expected_outputs = {
        "st": {"dense"},
        "jina": {f"dense[{task}]" for task in TASKS},
        "aapot": {"dense", "sparse", "colbert"},
        "baai": {"dense", "sparse", "colbert"},
    }
    for name, (_, int8) in family_dirs.items():
        report = report_of(int8)
        assert report["passed"] and set(report["outputs"]) == expected_outputs[name], name
        assert report["quantized"] and report["calibration"]["texts"] == CALIBRATION
        for stats in report["outputs"].values():
            assert stats["min"] >= FLOOR_MIN and stats["mean"] >= FLOOR_MEAN
            assert stats["min"] <= stats["p1"] <= stats["mean"] <= 1.0 + 1e-6
        assert "| output |" in (int8 / REPORT_MD).read_text(encoding="utf-8")
    # The graph really is integer arithmetic now.
    graph = (family_dirs["st"][1] / "model.onnx").read_bytes()
    assert b"MatMulIntegerToFloat" in graph


def test_below_the_floor_is_refused_naming_the_worst_output(family_dirs, tmp_path: Path, capsys):
    source = family_dirs["aapot"][0]
    destination = tmp_path / "refused"
    args = [str(source), str(destination), "--texts", "20", "--min-cosine", "0.9999999", "--max-fp32", "0"]
    assert quantize_cli(args) == 1
    message = capsys.readouterr().err
    assert "below the fidelity floor" in message and "--force" in message
    worst = next(
        o for o in ("dense", "sparse", "colbert") if f"worst output {o} has min cosine 0.9" in message
    )
    assert worst
    assert not destination.exists()
    # --force writes it, and the report says it is below the floor.
    assert quantize_cli([*args, "--force"]) == 0
    report = report_of(destination)
    assert report["passed"] is False
    assert report["worst"]["output"] == worst
    assert f"{report['worst']['min']:.5f}" in message


def test_keeps_the_most_sensitive_matmuls_in_fp32_to_meet_the_floor(family_dirs, tmp_path: Path):
    """A floor between 'all int8' and 'one MatMul kept fp32' is met by keeping one; the report names it."""
    source = family_dirs["st"][0]
    all_int8 = report_of(family_dirs["st"][1])["outputs"]["dense"]["min"]
    probe = tmp_path / "probe"  # what keeping the most damaging MatMul gives (forced past a floor of 1)
    args = [str(source), str(probe), "--texts", str(CALIBRATION), "--max-fp32", "1", "--force"]
    assert quantize_cli([*args, "--min-cosine", "1.0"]) == 0
    kept_one = report_of(probe)
    assert len(kept_one["kept_fp32"]) == 1 and kept_one["outputs"]["dense"]["min"] > all_int8
    floor = (all_int8 + kept_one["outputs"]["dense"]["min"]) / 2
    destination = tmp_path / "kept"
    assert (
        quantize_cli([str(source), str(destination), "--texts", str(CALIBRATION), "--min-cosine", str(floor)])
        == 0
    )
    report = report_of(destination)
    assert report["passed"] and report["kept_fp32"] == kept_one["kept_fp32"]
    assert report["outputs"]["dense"]["min"] >= floor
    assert report["kept_fp32"][0] not in report["quantized"]


def test_calibration_from_jsonl(family_dirs, tmp_path: Path):
    calibration = tmp_path / "texts.jsonl"
    calibration.write_text('"the cat sat on the mat"\n{"text": "a dog barks loudly"}\n\n"one more text"\n')
    destination = tmp_path / "jsonl"
    assert quantize_cli([str(family_dirs["st"][0]), str(destination), "--calibration", str(calibration)]) == 0
    assert report_of(destination)["calibration"] == {"source": str(calibration), "texts": 3}
    calibration.write_text('"fine"\n{"txt": 1}\n')
    assert (
        quantize_cli([str(family_dirs["st"][0]), str(tmp_path / "bad"), "--calibration", str(calibration)])
        == 1
    )


# --- through the real server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_servers(family_dirs) -> Iterator[tuple[RunningServer, RunningServer]]:
    """One server on the fp32 models, one on the int8 copies, same names."""
    fp32 = start_server(
        *[arg for name, (src, _) in family_dirs.items() for arg in ("--model", f"{name}={src}")]
    )
    int8 = start_server(
        *[arg for name, (_, dst) in family_dirs.items() for arg in ("--model", f"{name}={dst}")]
    )
    yield fp32, int8
    fp32.stop()
    int8.stop()


def served(server: RunningServer, model: str, texts: list[str], **fields) -> pb.EmbedResponse:
    request = pb.EmbedRequest(model=model, inputs=texts, truncate=True, **fields)
    return server.stub().Embed(request, timeout=60)


def sparse_cosine(a: pb.Embedding, b: pb.Embedding) -> float:
    va = dict(zip(a.sparse.indices, a.sparse.values, strict=True))
    vb = dict(zip(b.sparse.indices, b.sparse.values, strict=True))
    if not va and not vb:
        return 1.0  # both empty (no token above zero): the same lexical vector
    dot = sum(v * vb.get(k, 0.0) for k, v in va.items())
    return dot / (np.linalg.norm(list(va.values())) * np.linalg.norm(list(vb.values())))


def test_list_models_reports_precision(family_servers):
    fp32, int8 = family_servers
    for server, precision in ((fp32, "fp32"), (int8, "int8")):
        models = server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models
        assert {m.precision for m in models} == {precision}


def test_served_dense_matches_the_report(family_servers, family_dirs):
    """The server serves what the report measured: same texts, same minimum cosine."""
    fp32, int8 = family_servers
    texts = default_texts(CALIBRATION)
    for name in ("st", "aapot"):
        a = np.array([e.dense.values for e in served(fp32, name, texts).embeddings])
        b = np.array([e.dense.values for e in served(int8, name, texts).embeddings])
        cosines = (normalize(a) * normalize(b)).sum(-1)
        reported = report_of(family_dirs[name][1])["outputs"]["dense"]
        assert abs(cosines.min() - reported["min"]) < 1e-4, name
        assert abs(cosines.mean() - reported["mean"]) < 1e-4, name


def test_every_output_of_every_family_is_within_the_floor_when_served(family_servers):
    fp32, int8 = family_servers
    texts = ["the cat sat on the mat", "What is the capital of France?", "a dog barks " * 8, "hi"]
    checked = []
    for task_name, task in TASKS.items():
        a = np.array([e.dense.values for e in served(fp32, "jina", texts, task=task).embeddings])
        b = np.array([e.dense.values for e in served(int8, "jina", texts, task=task).embeddings])
        checked.append((f"jina {task_name}", (normalize(a) * normalize(b)).sum(-1)))
    outputs = [pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_SPARSE, pb.OUTPUT_TYPE_COLBERT]
    for name in ("aapot", "baai"):
        ra, rb = (served(s, name, texts, outputs=outputs).embeddings for s in (fp32, int8))
        for ea, eb in zip(ra, rb, strict=True):
            kind = ea.WhichOneof("vector")
            assert kind == eb.WhichOneof("vector")
            if kind == "dense":
                checked.append(
                    (
                        f"{name} dense",
                        [float(normalize(np.array(ea.dense.values)) @ normalize(np.array(eb.dense.values)))],
                    )
                )
            elif kind == "sparse":
                checked.append((f"{name} sparse", [sparse_cosine(ea, eb)]))
            else:
                rows = [np.array(m.values).reshape(-1, m.dimensions) for m in (ea.colbert, eb.colbert)]
                checked.append((f"{name} colbert", (normalize(rows[0]) * normalize(rows[1])).sum(-1)))
    st = [np.array([e.dense.values for e in served(s, "st", texts).embeddings]) for s in (fp32, int8)]
    checked.append(("st dense", (normalize(st[0]) * normalize(st[1])).sum(-1)))
    kinds = {label.split()[-1] for label, _ in checked}
    assert {"dense", "sparse", "colbert"} <= kinds
    for label, cosines in checked:
        assert min(cosines) >= FLOOR_MIN, label


def test_quantize_at_start_is_cached_and_reused(family_dirs, tmp_path: Path):
    source = family_dirs["aapot"][0]
    args = ("--model", f"aapot={source}", "--quantize", "int8", "--cache-dir", str(tmp_path))
    first = start_server(*args)
    try:
        models = first.stub().ListModels(pb.ListModelsRequest(), timeout=10).models
        assert models[0].precision == "int8"
        vector = served(first, "aapot", ["the cat sat on the mat"]).embeddings[0].dense.values
    finally:
        first.stop()
    assert "quantizing to int8" in first.log()
    entries = list((tmp_path / "int8").iterdir())
    assert len(entries) == 1 and (entries[0] / REPORT_JSON).is_file()
    stamp = (entries[0] / REPORT_JSON).stat().st_mtime_ns
    second = start_server(*args)
    try:
        assert served(second, "aapot", ["the cat sat on the mat"]).embeddings[0].dense.values == vector
    finally:
        second.stop()
    assert "int8 from the cache" in second.log() and "quantizing to int8" not in second.log()
    assert (entries[0] / REPORT_JSON).stat().st_mtime_ns == stamp


# --- the built-in model in int8 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The built-in model with --quantize int8 (quantized once per test session, in its own cache)."""
    server = start_server(
        "--quantize", "int8", "--cache-dir", str(tmp_path_factory.mktemp("cache")), timeout=600
    )
    yield server
    server.stop()


def dense(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.dense.values for e in response.embeddings], dtype=np.float32)


def test_int8_default_model_is_within_the_floor_of_the_reference(int8_default_server):
    info = int8_default_server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    assert info.name == "all-minilm-l6-v2" and info.precision == "int8"
    vectors = dense(int8_default_server.stub().Embed(pb.EmbedRequest(inputs=SENTENCES), timeout=60))
    cosines = (vectors * ref.embed(SENTENCES)).sum(-1)
    print(f"int8 default model vs numpy fp32 reference: min {cosines.min():.5f} mean {cosines.mean():.5f}")
    assert cosines.min() >= FLOOR_MIN


def test_int8_vectors_do_not_depend_on_the_batch(int8_default_server):
    """Per-row scales: a text alone and inside batches of other lengths gives the same vector."""
    stub = int8_default_server.stub()
    text = "A short sentence about cats."
    alone = dense(stub.Embed(pb.EmbedRequest(inputs=[text]), timeout=60))[0]
    batches = [
        [LONG_TEXT, text, "x"],
        ["hi", text],
        [LONG_TEXT.upper(), LONG_TEXT, "an unrelated sentence with some words", text],
        [text] * 5,
    ]
    for batch in batches:
        vectors = dense(stub.Embed(pb.EmbedRequest(inputs=batch), timeout=60))
        for row in (i for i, t in enumerate(batch) if t == text):
            assert float(alone @ vectors[row]) >= 0.99999, batch
    long_alone = dense(stub.Embed(pb.EmbedRequest(inputs=[LONG_TEXT]), timeout=60))[0]
    assert float(long_alone @ dense(stub.Embed(pb.EmbedRequest(inputs=batches[0]), timeout=60))[0]) >= 0.99999


def test_a_graph_past_protobufs_limit_counts_as_too_big_to_hold_inline():
    """jina-v3 / bge-m3 at full size (2.27 GB fp32) once crashed embedding-quantize: ``ByteSize`` of
    a model past 2 GiB raises EncodeError (measured on the full-size synthetic jina-v3)."""
    import onnx
    from embedding_server.quantize.core import INLINE_LIMIT, inline_bytes
    from google.protobuf.message import EncodeError

    class PastTheLimit:
        def ByteSize(self) -> int:
            raise EncodeError("Failed to serialize proto")

    assert inline_bytes(PastTheLimit()) > INLINE_LIMIT  # type: ignore[arg-type]
    small = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert inline_bytes(small) == small.ByteSize() < INLINE_LIMIT
