"""Engines and precisions: bf16 against numpy, the choice rule, the cached choice, refused choices.

The fp32 family tests (test_jina_v3.py, test_bge_m3.py, test_model_loading.py) run on both
engines already (``ENGINES_AT_FP32``); this module adds OpenVINO bf16 (where the CPU runs it
natively) with the looser bound bf16 promises, and the ``auto`` machinery around it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.errors import StartupError
from embedding_server.models import engines, openvino_pool
from embedding_server.models.engines import ONNXRUNTIME, OPENVINO, Candidate
from embedding_server.selection import measure
from embedding_server.selection.rule import MIN_SPEEDUP, REFERENCE, Measured, choose, speedup

from tests.support.reference import BgeM3Reference, CosineLog, JinaV3Reference, SentenceTransformersReference
from tests.support.server import RunningServer, free_port, server_command, start_server
from tests.support.synthetic import make_bge_m3_baai, make_jina_v3, make_sentence_transformers

NATIVE_BF16 = openvino_pool.native_bf16()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16 (AMX / AVX-512 BF16)")
#: What bf16 keeps on the tiny random models (measured ~0.9995-0.99999; the real MiniLM 0.99996).
BF16_COSINE = 0.999
TEXT = "The quick brown fox jumps over the lazy dog and the cat sat on the mat."
CHUNKS = ["The cat sat on the mat.", "It was happy there in the evening sun.", "Dogs bark at night"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("engines")
    return {
        "jina": make_jina_v3(root / "jina", seed=21),
        "bge": make_bge_m3_baai(root / "bge", seed=22),
        "st": make_sentence_transformers(root / "st", pooling="mean", normalize=True, seed=23),
    }


def model_args(dirs: dict[str, object]) -> list[str]:
    return [arg for name, model in dirs.items() for arg in ("--model", f"{name}={model.path}")]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def bf16_server(dirs: dict[str, object]) -> Iterator[RunningServer]:
    if not NATIVE_BF16:
        pytest.skip("this CPU has no native bf16")
    running = start_server(*model_args(dirs), "--engine", "openvino", "--precision", "bf16", rest=True)
    yield running
    running.stop()


# --- bf16 against numpy, every family ------------------------------------------------------------


@needs_bf16
def test_bf16_describes_itself(bf16_server):
    models = bf16_server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models
    assert {(m.engine, m.precision) for m in models} == {("openvino", "bf16")}
    for name in ("jina", "bge", "st"):
        assert (
            bf16_server.metric("embedding_model_info", model=name, engine="openvino", precision="bf16") == 1
        )
    listed = bf16_server_rest_models(bf16_server)
    assert {(m["engine"], m["precision"]) for m in listed} == {("openvino", "bf16")}


def bf16_server_rest_models(server: RunningServer) -> list[dict[str, object]]:
    import httpx

    return list(httpx.get(f"{server.rest_url}/v1/models", timeout=10).json()["data"])


@needs_bf16
@pytest.mark.parametrize("task", [1, 2, 3, 4, 5])
def test_bf16_jina_every_task_and_matryoshka(bf16_server, dirs, task):
    cosines = CosineLog()
    ref = JinaV3Reference(dirs["jina"])  # type: ignore[arg-type]
    stub = bf16_server.stub()
    for dimensions in (0, 32):
        request = pb.EmbedRequest(model="jina", inputs=[TEXT, "cats"], task=task, dimensions=dimensions)
        for text, e in zip([TEXT, "cats"], stub.Embed(request, timeout=30).embeddings, strict=True):
            cosines.check("jina", e.dense.values, ref.dense(text, task, dimensions), BF16_COSINE)


@needs_bf16
def test_bf16_jina_late_chunking(bf16_server, dirs):
    ref = JinaV3Reference(dirs["jina"])  # type: ignore[arg-type]
    request = pb.EmbedRequest(model="jina", inputs=CHUNKS, task=2, late_chunking=True)
    got = bf16_server.stub().Embed(request, timeout=30).embeddings
    for e, want in zip(got, ref.late_chunks(CHUNKS, 2), strict=True):
        CosineLog().check("jina/late", e.dense.values, want, BF16_COSINE)


@needs_bf16
def test_bf16_bge_m3_dense_sparse_colbert(bf16_server, dirs):
    ref = BgeM3Reference(dirs["bge"]).encode(TEXT)  # type: ignore[arg-type]
    request = pb.EmbedRequest(model="bge", inputs=[TEXT], outputs=[1, 2, 3])
    dense, sparse, colbert = bf16_server.stub().Embed(request, timeout=30).embeddings
    log = CosineLog()
    log.check("bge/dense", dense.dense.values, ref.dense, BF16_COSINE)
    # Sparse: a weight next to the ReLU's zero may flip in bf16, so compare the id -> weight vectors.
    got = dict(zip(sparse.sparse.indices, sparse.sparse.values, strict=True))
    ids = sorted(set(got) | set(ref.sparse))
    log.check(
        "bge/sparse", [got.get(i, 0.0) for i in ids], [ref.sparse.get(i, 0.0) for i in ids], BF16_COSINE
    )
    rows = np.array(colbert.colbert.values).reshape(-1, colbert.colbert.dimensions)
    assert rows.shape == ref.colbert.shape
    for row, want in zip(rows, ref.colbert, strict=True):
        log.check("bge/colbert", row, want, BF16_COSINE)


@needs_bf16
def test_bf16_sentence_transformers_and_binary(bf16_server, dirs):
    ref = SentenceTransformersReference(dirs["st"])  # type: ignore[arg-type]
    request = pb.EmbedRequest(model="st", inputs=[TEXT, "cats"], outputs=[1, 4])
    embeddings = bf16_server.stub().Embed(request, timeout=30).embeddings
    for i, text in enumerate([TEXT, "cats"]):
        CosineLog().check("st", embeddings[2 * i].dense.values, ref.dense(text), BF16_COSINE)
        # bf16 is really on: fp32 on either engine matches numpy to ~1e-7, bf16 does not
        assert np.abs(np.array(embeddings[2 * i].dense.values) - ref.dense(text)).max() > 1e-4
        bits = np.unpackbits(np.frombuffer(embeddings[2 * i + 1].binary.bits, np.uint8))
        agree = (bits[: len(ref.dense(text))] == (ref.dense(text) > 0)).mean()
        assert agree > 0.95  # signs of components near 0 may differ in bf16


@needs_bf16
def test_bf16_vectors_do_not_depend_on_batch_neighbours(bf16_server):
    """A text alone and in a batch padded by a much longer neighbour: the same vector."""
    stub = bf16_server.stub()
    alone = stub.Embed(pb.EmbedRequest(model="st", inputs=["cats"]), timeout=30).embeddings[0]
    batch = stub.Embed(pb.EmbedRequest(model="st", inputs=["cats", TEXT * 3], truncate=True), timeout=30)
    np.testing.assert_allclose(alone.dense.values, batch.embeddings[0].dense.values, atol=2e-3)


# --- the choice rule, a pure function ------------------------------------------------------------

OV_FP32, OV_BF16, ORT_INT8 = (
    Candidate(OPENVINO, "fp32"),
    Candidate(OPENVINO, "bf16"),
    Candidate(ONNXRUNTIME, "int8"),
)


def row(candidate: Candidate, short: float, long: float, cosine: float) -> Measured:
    return Measured(candidate, short, long, cosine, "dense")


TABLE = [
    row(REFERENCE, 240, 32, 1.0),
    row(OV_FP32, 228, 31, 1.0),
    row(OV_BF16, 630, 87, 0.99996),
    row(ORT_INT8, 430, 80, 0.993),
]


def test_the_fastest_candidate_at_the_floor_wins():
    assert choose(TABLE, 0.9999).candidate == OV_BF16
    assert choose(TABLE, 0.99999).candidate == REFERENCE  # bf16 below it; OV fp32 is slower
    assert choose(TABLE, 0.99).candidate == OV_BF16  # int8 passes but is slower than bf16


def test_speed_is_the_geometric_mean_of_short_and_long():
    fast_short_only = row(OV_FP32, 2400, 3.2, 1.0)  # 10x on short, 0.1x on long: 1.0x overall
    assert speedup(fast_short_only, TABLE[0]) == pytest.approx(1.0)
    assert choose([TABLE[0], fast_short_only], 0.9999).candidate == REFERENCE  # a tie keeps the reference


def test_the_reference_stays_unless_beaten_by_the_margin():
    """Within MIN_SPEEDUP the reference keeps its place (a measurement moves by 5-10% here)."""
    just_faster = row(OV_FP32, 240 * (MIN_SPEEDUP - 0.01), 32 * (MIN_SPEEDUP - 0.01), 1.0)
    clearly_faster = row(OV_FP32, 240 * (MIN_SPEEDUP + 0.01), 32 * (MIN_SPEEDUP + 0.01), 1.0)
    assert choose([TABLE[0], just_faster], 0.9999).candidate == REFERENCE
    assert choose([TABLE[0], clearly_faster], 0.9999).candidate == OV_FP32
    # without the reference among the allowed (--engine openvino), the fastest allowed row still wins
    assert choose([TABLE[0], just_faster, TABLE[2]], 0.9, allowed=[OV_FP32, OV_BF16]).candidate == OV_BF16
    assert choose([TABLE[0], just_faster], 0.9999, allowed=[OV_FP32]).candidate == OV_FP32


def test_an_explicit_engine_is_honoured_even_below_the_floor():
    lossy = [TABLE[0], row(OV_FP32, 100, 10, 0.9), row(OV_BF16, 300, 40, 0.8)]
    assert choose(lossy, 0.9999, allowed=[OV_FP32, OV_BF16]).candidate == OV_FP32  # the most faithful
    assert choose(TABLE, 0.9999, allowed=[OV_FP32, OV_BF16]).candidate == OV_BF16


def test_auto_never_tries_int8_and_leaves_out_emulated_bf16(monkeypatch):
    assert Candidate(ONNXRUNTIME, "int8") not in measure.candidates("auto", "auto")
    monkeypatch.setattr(measure, "native_bf16", lambda: False)
    monkeypatch.setattr(engines, "native_bf16", lambda: False)
    assert measure.candidates("auto", "auto") == [REFERENCE, OV_FP32]


def test_bf16_on_a_cpu_without_it_is_one_clear_line(monkeypatch):
    """The real check runs below on such CPUs; here the capability is taken away."""
    monkeypatch.setattr(engines, "native_bf16", lambda: False)
    with pytest.raises(StartupError, match=r"no native bf16 .*emulated"):
        measure.candidates("openvino", "bf16")


# --- the server: refused choices, and the measured choice cached -----------------------------------


def failing(*args: str) -> list[str]:
    command = server_command(["--host", "127.0.0.1", "--port", str(free_port()), "--rest-port", "0", *args])
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    return lines


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--engine", "onnxruntime", "--precision", "bf16"), "no bf16 kernels"),
        (("--engine", "openvino", "--precision", "int8"), "does not run the quantizer's int8"),
        (("--engine", "openvino", "--quantize", "int8"), "does not run the quantizer's int8"),
    ],
)
def test_an_impossible_explicit_choice_is_one_startup_line(flags, words):
    (line,) = failing("--log-level", "error", *flags)
    assert line.startswith("embedding-server: error: --engine") and words in line, line


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU runs bf16 natively")
def test_bf16_is_refused_on_this_cpu():
    (line,) = failing("--log-level", "error", "--engine", "openvino", "--precision", "bf16")
    assert "no native bf16" in line, line


def test_auto_measures_once_then_reuses_the_table(dirs, tmp_path):
    """First start: measured, logged as a table, cached; second start: the same choice, not measured."""
    args = ("--model", f"st={dirs['st'].path}", "--engine", "auto", "--cache-dir", str(tmp_path))  # type: ignore[attr-defined]
    first = start_server(*args)
    try:
        assert first.logged("measuring onnxruntime fp32, openvino fp32")
        chosen = first.stub().ListModels(pb.ListModelsRequest(), timeout=10).models[0]
    finally:
        first.stop()
    (cached,) = (tmp_path / "engine-choice").glob("st-*.json")
    table = json.loads(cached.read_text())["table"]
    assert {(r["candidate"]["engine"], r["candidate"]["precision"]) for r in table} >= {
        ("onnxruntime", "fp32"),
        ("openvino", "fp32"),
    }
    assert (table[0]["min_cosine"], table[1]["min_cosine"] > 0.9999) == (1.0, True)
    second = start_server(*args)
    try:
        assert second.logged("measured earlier on this CPU")
        assert "measuring" not in second.log()
        again = second.stub().ListModels(pb.ListModelsRequest(), timeout=10).models[0]
        assert (again.engine, again.precision) == (chosen.engine, chosen.precision)
    finally:
        second.stop()


def test_the_default_server_keeps_the_exactness_goal_on_the_built_in_model():
    """At default flags (auto) the built-in model, whatever engine won here, is within cosine 0.9999
    of plain numpy from the fp32 safetensors, short and window-long inputs alike.

    The default cache, as ``make serve`` uses it: the engine table measured there once (by whichever
    server started first; the measuring itself is test_auto_measures_once_then_reuses_the_table's)."""
    from tests.support import minilm_reference as numpy_ref

    server = start_server("--engine", "auto")
    try:
        chosen = server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models[0]
        assert server.logged(f"serving on {chosen.engine} {chosen.precision}")
        texts = ["cats", TEXT, " ".join([TEXT] * 12)]  # the last is cut to 256 tokens
        reply = server.stub().Embed(pb.EmbedRequest(inputs=texts, truncate=True), timeout=60)
        for text, embedding in zip(texts, reply.embeddings, strict=True):
            ids = numpy_ref.tokenize(text, 256).ids
            want = numpy_ref.normalize(numpy_ref.pooled([ids]))[0]
            CosineLog().check(f"default/{chosen.engine}-{chosen.precision}", embedding.dense.values, want)
    finally:
        server.stop()


def test_openvino_gives_a_long_run_s_buffers_back_once_idle():
    """A compiled model keeps its largest run's buffers; the pool releases them after a quiet second."""
    from embedding_server.engine.memory import current_rss
    from embedding_server.models.loader import builtin_files
    from embedding_server.models.openvino_pool import OpenVinoPool

    from tests.support.polling import until_sync

    pool = OpenVinoPool(builtin_files().onnx, sessions=1, threads=1, precision="fp32")
    ids = np.full((32, 256), 1000, np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    before = current_rss()
    pool.run(0, ["last_hidden_state"], feeds)
    held = current_rss() - before
    assert pool.holds_long_run_buffers and held > 100 * 2**20  # the fixture has teeth: it is held
    until_sync(lambda: not pool.holds_long_run_buffers, "the buffers released", limit=30)
    assert current_rss() - before < held / 2
