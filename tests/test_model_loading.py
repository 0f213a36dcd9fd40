"""Loading model directories: family detection, both ONNX layouts, and broken directories.

A broken directory must stop the server at start-up with a non-zero exit and
one line that names the file at fault (no traceback): an operator reads it
in a pod's log.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.errors import ModelLoadError
from embedding_server.models.torch_weights import load_state_dict

from tests.support.reference import (
    COSINES,
    BgeM3Reference,
    JinaV3Reference,
    SentenceTransformersReference,
)
from tests.support.server import ENGINES_AT_FP32, RunningServer, free_port, server_command, start_server
from tests.support.synthetic import (
    BGE_M3_HEADS,
    BGE_M3_HIDDEN,
    JINA_HIDDEN,
    ST_HIDDEN,
    ST_MAX_TOKENS,
    make_bge_m3_aapot,
    make_bge_m3_baai,
    make_jina_v3,
    make_sentence_transformers,
)

TEXT = "The quick brown fox jumps over the lazy dog."
ST_PROMPTS = {"query": "query: ", "passage": "passage: "}


def move_onnx_to_top(directory: Path) -> Path:
    """The other layout: onnx/* (graph and its external files) moved up beside the configs."""
    for item in (directory / "onnx").iterdir():
        shutil.move(str(item), directory / item.name)
    (directory / "onnx").rmdir()
    return directory


# --- family detection, both layouts ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("families")
    baai_top = make_bge_m3_baai(root / "bge-baai-top", seed=9)
    move_onnx_to_top(baai_top.path)
    return {
        "jina-onnx": make_jina_v3(root / "jina-onnx"),
        "jina-top": make_jina_v3(root / "jina-top", layout="top", task_id_rank=1, seed=8),
        "bge-baai-onnx": make_bge_m3_baai(root / "bge-baai-onnx"),
        "bge-baai-top": baai_top,
        "bge-aapot-top": make_bge_m3_aapot(root / "bge-aapot-top"),
        "st-cls-top": make_sentence_transformers(root / "st-cls-top", pooling="cls", normalize=False),
        "st-mean-onnx": make_sentence_transformers(
            root / "st-mean-onnx", pooling="mean", normalize=True, layout="onnx", seed=12
        ),
        "st-prompts": make_sentence_transformers(
            root / "st-prompts", pooling="mean", normalize=True, seed=13, prompts=ST_PROMPTS
        ),
        "st-default-prompt": make_sentence_transformers(
            root / "st-default-prompt",
            pooling="mean",
            normalize=True,
            seed=13,
            prompts=ST_PROMPTS,
            default_prompt_name="query",
        ),
    }


FAMILIES = {
    "jina-onnx": "jina-v3",
    "jina-top": "jina-v3",
    "bge-baai-onnx": "bge-m3",
    "bge-baai-top": "bge-m3",
    "bge-aapot-top": "bge-m3",
    "st-cls-top": "sentence-transformers",
    "st-mean-onnx": "sentence-transformers",
    "st-prompts": "sentence-transformers",
    "st-default-prompt": "sentence-transformers",
}


@pytest.fixture(scope="module", params=list(ENGINES_AT_FP32))
def server(dirs: dict[str, object], request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    args = [arg for name, model in dirs.items() for arg in ("--model", f"{name}={model.path}")]  # type: ignore[attr-defined]
    running = start_server(*args, *ENGINES_AT_FP32[request.param])
    yield running
    running.stop()


def test_layouts_are_the_ones_meant(dirs):
    assert (dirs["jina-onnx"].path / "onnx" / "model.onnx_data").is_file()
    assert (dirs["jina-top"].path / "model.onnx_data").is_file()
    assert not (dirs["jina-top"].path / "onnx").exists()
    assert (dirs["bge-baai-top"].path / "Constant_7_attr__value").is_file()
    assert (dirs["st-mean-onnx"].path / "onnx" / "model.onnx").is_file()


def test_every_family_and_layout_is_detected(server, dirs):
    models = {m.name: m for m in server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert {name: info.family for name, info in models.items()} == FAMILIES
    assert [name for name, info in models.items() if info.is_default] == ["jina-onnx"]
    assert models["jina-top"].dimensions == JINA_HIDDEN
    assert models["bge-baai-top"].dimensions == BGE_M3_HIDDEN
    assert list(models["bge-baai-top"].outputs) == [1, 2, 3, 4]
    st = models["st-cls-top"]
    assert (st.dimensions, st.max_tokens, list(st.tasks), list(st.outputs)) == (
        ST_HIDDEN,
        ST_MAX_TOKENS,
        [],
        [1, 4],
    )
    assert list(st.matryoshka_dimensions) == []


@pytest.mark.parametrize("name", ["jina-onnx", "jina-top"])
def test_jina_layouts_embed_like_the_reference(server, dirs, name):
    response = server.stub().Embed(pb.EmbedRequest(model=name, inputs=[TEXT], task=2), timeout=30)
    ref = JinaV3Reference(dirs[name]).dense(TEXT, 2)
    COSINES.check(f"loading/{name}", response.embeddings[0].dense.values, ref)


@pytest.mark.parametrize("name", ["bge-baai-onnx", "bge-baai-top", "bge-aapot-top"])
def test_bge_layouts_embed_like_the_reference(server, dirs, name):
    request = pb.EmbedRequest(model=name, inputs=[TEXT], outputs=[1, 2, 3])
    dense, sparse, colbert = server.stub().Embed(request, timeout=30).embeddings
    ref = BgeM3Reference(dirs[name]).encode(TEXT)
    COSINES.check(f"loading/{name}/dense", dense.dense.values, ref.dense)
    COSINES.check_sparse(
        f"loading/{name}/sparse", list(sparse.sparse.indices), list(sparse.sparse.values), ref.sparse
    )
    rows = np.array(colbert.colbert.values).reshape(-1, colbert.colbert.dimensions)
    for got, want in zip(rows, ref.colbert, strict=True):
        COSINES.check(f"loading/{name}/colbert", got, want)


def test_sentence_transformers_cls_without_normalize(server, dirs):
    """CLS pooling, no Normalize module: the raw CLS state; ``dimensions`` normalizes."""
    ref = SentenceTransformersReference(dirs["st-cls-top"])
    stub = server.stub()
    texts = [TEXT, "cats"]
    response = stub.Embed(pb.EmbedRequest(model="st-cls-top", inputs=texts), timeout=30)
    for text, embedding in zip(texts, response.embeddings, strict=True):
        values = np.array(embedding.dense.values)
        expected = ref.dense(text)
        assert abs(np.linalg.norm(expected) - 1.0) > 0.05  # so "not normalized" is observable
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)
    sliced = stub.Embed(pb.EmbedRequest(model="st-cls-top", inputs=texts, dimensions=5), timeout=30)
    for text, embedding in zip(texts, sliced.embeddings, strict=True):
        COSINES.check("loading/st-cls/dense", embedding.dense.values, ref.dense(text, 5))
        np.testing.assert_allclose(np.linalg.norm(embedding.dense.values), 1.0, atol=1e-5)


def test_sentence_transformers_mean_with_normalize(server, dirs):
    ref = SentenceTransformersReference(dirs["st-mean-onnx"])
    texts = [TEXT, "cats", "a b c d e f"]
    response = server.stub().Embed(pb.EmbedRequest(model="st-mean-onnx", inputs=texts), timeout=30)
    for text, embedding in zip(texts, response.embeddings, strict=True):
        COSINES.check("loading/st-mean/dense", embedding.dense.values, ref.dense(text))
        np.testing.assert_allclose(np.linalg.norm(embedding.dense.values), 1.0, atol=1e-5)


# --- broken directories: one line, non-zero exit ----------------------------------------------------


def run_failing_server(model_dir: Path) -> tuple[int, list[str]]:
    """Start a server on ``model_dir`` expecting it to refuse; its exit code and output lines."""
    command = server_command(
        [
            "--host", "127.0.0.1",
            "--port", str(free_port()),
            "--rest-port", "0",
            "--log-level", "warning",
            "--model", f"broken={model_dir}",
        ]
    )  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    return done.returncode, (done.stdout + done.stderr).strip().splitlines()


def assert_one_line_naming(model_dir: Path, file: str, breaker: Callable[[Path], None]) -> str:
    breaker(model_dir)
    code, lines = run_failing_server(model_dir)
    assert code != 0
    assert len(lines) == 1, lines
    (line,) = lines
    assert "Traceback" not in line
    assert line.startswith("embedding-server: error: ")
    assert file in line, line
    return line


def unlink(relative: str) -> Callable[[Path], None]:
    return lambda directory: (directory / relative).unlink()


def overwrite(relative: str, data: bytes) -> Callable[[Path], None]:
    return lambda directory: (directory / relative).write_bytes(data)


def test_missing_external_data_file_is_named(tmp_path):
    model = make_jina_v3(tmp_path / "jina")
    line = assert_one_line_naming(model.path, "onnx/model.onnx_data", unlink("onnx/model.onnx_data"))
    assert "missing" in line


def test_missing_baai_constant_file_is_named(tmp_path):
    model = make_bge_m3_baai(tmp_path / "bge")
    assert_one_line_naming(model.path, "Constant_7_attr__value", unlink("onnx/Constant_7_attr__value"))


@pytest.mark.parametrize("garbage", [b"", b"not an onnx graph \x00\x01\x02" * 10])
def test_corrupt_model_onnx_is_named(tmp_path, garbage):
    model = make_jina_v3(tmp_path / "jina")
    assert_one_line_naming(model.path, "onnx/model.onnx", overwrite("onnx/model.onnx", garbage))


def test_truncated_external_data_is_named(tmp_path):
    model = make_jina_v3(tmp_path / "jina")
    data = model.path / "onnx" / "model.onnx_data"
    assert_one_line_naming(
        model.path, "model.onnx", overwrite("onnx/model.onnx_data", data.read_bytes()[:100])
    )


def test_missing_tokenizer_is_named(tmp_path):
    model = make_bge_m3_aapot(tmp_path / "bge")
    assert_one_line_naming(model.path, "tokenizer.json", unlink("tokenizer.json"))


def test_unreadable_tokenizer_is_named(tmp_path):
    model = make_jina_v3(tmp_path / "jina")
    assert_one_line_naming(model.path, "tokenizer.json", overwrite("tokenizer.json", b"{not json"))


def test_unreadable_config_is_named(tmp_path):
    model = make_jina_v3(tmp_path / "jina")
    assert_one_line_naming(model.path, "config.json", overwrite("config.json", b"{\x00"))


def test_missing_model_directory_is_named(tmp_path):
    code, lines = run_failing_server(tmp_path / "nowhere")
    assert code != 0 and len(lines) == 1 and "nowhere" in lines[0], lines


def test_corrupt_torch_head_is_named(tmp_path):
    model = make_bge_m3_baai(tmp_path / "bge")
    assert_one_line_naming(
        model.path, "colbert_linear.pt", overwrite("colbert_linear.pt", b"PK\x03\x04broken")
    )


# --- torch weights without torch: only tensors ------------------------------------------------------


class RunsCode:
    """Unpickling this calls ``function(*args)``: what a malicious .pt file would do."""

    def __init__(self, function: Callable[..., object], *args: object) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def write_fake_pt(path: Path, state: object) -> Path:
    """A torch.save-shaped zip whose data.pkl is the given pickle."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(state, protocol=2))
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_torch_weights_refuse_a_disallowed_global(tmp_path, payload):
    marker = tmp_path / "pwned"
    command = f"open({str(marker)!r}, 'w').write('x')"
    evil = RunsCode(os.system, f"touch {marker}") if payload == "system" else RunsCode(eval, command)
    path = write_fake_pt(tmp_path / "sparse_linear.pt", OrderedDict(weight=evil))
    with pytest.raises(ModelLoadError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "refusing" in message
    assert ("system" if payload == "system" else "eval") in message
    assert not marker.exists()


def test_server_refuses_a_malicious_head_file(tmp_path):
    model = make_bge_m3_baai(tmp_path / "bge")
    marker = tmp_path / "pwned"

    def plant(directory: Path) -> None:
        write_fake_pt(
            directory / "sparse_linear.pt", OrderedDict(weight=RunsCode(os.system, f"touch {marker}"))
        )

    line = assert_one_line_naming(model.path, "sparse_linear.pt", plant)
    assert "refusing" in line
    assert not marker.exists()


def test_torch_weights_read_the_real_torch_files():
    """Against files torch itself wrote (tests/fixtures/make_bge_m3_heads.py)."""
    state = load_state_dict(BGE_M3_HEADS / "colbert_linear.pt")
    np.testing.assert_array_equal(state["weight"], np.load(BGE_M3_HEADS / "colbert_linear.weight.npy"))
    assert state["weight"].shape == (BGE_M3_HIDDEN, BGE_M3_HIDDEN)


def test_sentence_transformers_prompts_map_the_retrieval_tasks(server, dirs):
    """config_sentence_transformers.json prompts: query/passage for the two retrieval tasks."""
    models = {m.name: m for m in server.stub().ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert list(models["st-prompts"].tasks) == [pb.TASK_RETRIEVAL_QUERY, pb.TASK_RETRIEVAL_PASSAGE]
    ref = SentenceTransformersReference(dirs["st-prompts"])
    stub = server.stub()
    vectors = {}
    for task in (pb.TASK_UNSPECIFIED, pb.TASK_RETRIEVAL_QUERY, pb.TASK_RETRIEVAL_PASSAGE, pb.TASK_SEPARATION):
        request = pb.EmbedRequest(model="st-prompts", inputs=[TEXT], task=task)
        vectors[task] = np.array(stub.Embed(request, timeout=30).embeddings[0].dense.values)
        COSINES.check("loading/st-prompts/dense", vectors[task], ref.dense(TEXT, task=task))
        tokens = stub.Tokenize(pb.TokenizeRequest(model="st-prompts", inputs=[TEXT], task=task), timeout=10)
        assert list(tokens.results[0].ids) == ref.tokenizer.ids(ref.prefix(task) + TEXT)
    assert float(vectors[pb.TASK_RETRIEVAL_QUERY] @ vectors[pb.TASK_RETRIEVAL_PASSAGE]) < 0.999
    np.testing.assert_allclose(vectors[pb.TASK_SEPARATION], vectors[pb.TASK_UNSPECIFIED], atol=1e-6)


def test_sentence_transformers_default_prompt_applies_without_a_task(server, dirs):
    """default_prompt_name: sentence-transformers prepends that prompt when no task is asked for."""
    ref = SentenceTransformersReference(dirs["st-default-prompt"])
    stub = server.stub()
    tokens = stub.Tokenize(pb.TokenizeRequest(model="st-default-prompt", inputs=[TEXT]), timeout=10)
    assert list(tokens.results[0].ids) == ref.tokenizer.ids(ST_PROMPTS["query"] + TEXT)
    unspecified = stub.Embed(pb.EmbedRequest(model="st-default-prompt", inputs=[TEXT]), timeout=30)
    passage = stub.Embed(
        pb.EmbedRequest(model="st-default-prompt", inputs=[TEXT], task=pb.TASK_RETRIEVAL_PASSAGE), timeout=30
    )
    COSINES.check(
        "loading/st-default-prompt/dense",
        np.array(unspecified.embeddings[0].dense.values),
        ref.dense(TEXT, task=pb.TASK_RETRIEVAL_QUERY),
    )
    COSINES.check(
        "loading/st-default-prompt/dense",
        np.array(passage.embeddings[0].dense.values),
        ref.dense(TEXT, task=pb.TASK_RETRIEVAL_PASSAGE),
    )


def test_late_chunks_are_normalized_even_without_a_normalize_module(server):
    """models.md: each chunk vector is normalize(mean of its span), whatever the model's own rule."""
    stub = server.stub()
    plain = stub.Embed(pb.EmbedRequest(model="st-cls-top", inputs=[TEXT]), timeout=30)
    assert abs(np.linalg.norm(plain.embeddings[0].dense.values) - 1) > 1e-3  # no Normalize module
    chunks = stub.Embed(
        pb.EmbedRequest(model="st-cls-top", inputs=[TEXT, TEXT], late_chunking=True), timeout=30
    )
    norms = [np.linalg.norm(e.dense.values) for e in chunks.embeddings]
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
