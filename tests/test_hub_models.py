"""``--model NAME=hf:ORG/REPO[@REVISION]``: fetched once into --cache-dir, then loaded like a directory.

The hub is faked, as in test_download.py: a ``snapshot_download`` stand-in copies the files that
match ``allow_patterns`` from a local "repository" (a synthetic model with the extra files real
repositories carry) and raises huggingface_hub's own errors for an unknown repository or revision.
The real server is then started offline (HF_HUB_OFFLINE=1) on the cache the fake filled, and its
vectors are checked against numpy; a repository it has not seen stops it with one line.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.compose import ServedModels
from embedding_server.download import COMPLETE_MARK, GENERIC_FILES, PRESETS, fetch_hub_model, hub_cache_path
from embedding_server.errors import ModelLoadError
from embedding_server.models.files import locate
from embedding_server.models.loader import HubRef, ModelSpec
from embedding_server.quantize.cli import main as quantize_cli
from embedding_server.settings import Settings
from huggingface_hub import errors as hub_errors

from tests.support.reference import SentenceTransformersReference
from tests.support.server import free_port, server_command, start_server
from tests.support.synthetic import SentenceTransformersDir, make_sentence_transformers

REPO = "example-org/tiny-st"
#: What a real repository has beside what the server reads: none of it may be fetched.
UNWANTED = ("model.safetensors", "pytorch_model.bin", "onnx/model_quantized.onnx", "README.md")


def _http_error(kind: type[Exception], message: str) -> Exception:
    """huggingface_hub's HTTP errors need a response; built with the library's own HTTP module."""
    http = importlib.import_module(hub_errors.Response.__module__)
    response = http.Response(404, request=http.Request("GET", "https://huggingface.co/api/models"))
    return kind(message, response=response)


class FakeHub:
    """``snapshot_download`` over local directories: {repo_id: {revision: directory}}."""

    def __init__(self, repos: dict[str, dict[str, Path]], offline: bool = False) -> None:
        self.repos = repos
        self.offline = offline
        self.calls: list[dict[str, object]] = []

    def __call__(
        self, *, repo_id: str, revision: str | None, local_dir: str, allow_patterns: list[str]
    ) -> str:
        self.calls.append({"repo_id": repo_id, "revision": revision, "patterns": allow_patterns})
        if self.offline:
            raise hub_errors.LocalEntryNotFoundError("An error happened while trying to locate the files")
        if repo_id not in self.repos:
            raise _http_error(
                hub_errors.RepositoryNotFoundError, f"404 Client Error. Repository Not Found {repo_id}"
            )
        source = self.repos[repo_id].get(revision or "main")
        if source is None:
            raise _http_error(
                hub_errors.RevisionNotFoundError, f"404 Client Error. Revision Not Found {revision}"
            )
        for path in sorted(source.rglob("*")):
            relative = path.relative_to(source).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(relative, p) for p in allow_patterns):
                (Path(local_dir) / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(local_dir) / relative)
        return local_dir


@pytest.fixture(scope="module")
def st_repo(tmp_path_factory) -> SentenceTransformersDir:
    model = make_sentence_transformers(
        tmp_path_factory.mktemp("hub") / "tiny-st", pooling="mean", normalize=True, layout="onnx"
    )
    for name in UNWANTED:
        (model.path / name).parent.mkdir(parents=True, exist_ok=True)
        (model.path / name).write_bytes(b"not for the server")
    return model


def test_a_hub_id_parses_with_and_without_a_revision():
    assert ModelSpec.parse(f"st=hf:{REPO}") == ModelSpec("st", None, HubRef(REPO))
    assert ModelSpec.parse(f"hf:{REPO}@v1.0") == ModelSpec("tiny-st", None, HubRef(REPO, "v1.0"))
    assert str(HubRef(REPO, "v1.0")) == f"hf:{REPO}@v1.0"
    assert ModelSpec.parse("x=hf:org/repo@refs/pr/1").hub == HubRef("org/repo", "refs/pr/1")
    assert ModelSpec.parse(f"a=hf:{REPO}@main").source == ModelSpec.parse(f"b=hf:{REPO}").source
    served = ServedModels.from_settings(Settings(models=[f"a=hf:{REPO}", f"b=hf:{REPO}@main"]))
    assert len(served.specs) == 1 and served.aliases == {"b": "a"}  # loaded once, served twice
    for bad in ("hf:just-org", "hf:org/", "hf:/repo", "hf:org/repo@", "hf:a/b/c", "hf:org/..", "hf:o/r@../x"):
        with pytest.raises(ValueError, match="expected hf:ORG/REPO or hf:ORG/REPO@REVISION"):
            ModelSpec.parse(f"x={bad}")


def test_first_fetch_takes_only_what_the_loader_reads_then_the_cache_is_reused(tmp_path, st_repo, caplog):
    hub = FakeHub({REPO: {"main": st_repo.path}})
    caplog.set_level(logging.INFO, logger="embedding_server")
    path = fetch_hub_model(REPO, None, tmp_path, snapshot=hub)
    assert path == hub_cache_path(tmp_path, REPO, None) == tmp_path / "hub" / "example-org--tiny-st" / "main"
    assert hub.calls == [{"repo_id": REPO, "revision": None, "patterns": list(GENERIC_FILES)}]
    fetched = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert not fetched & set(UNWANTED)
    assert {"onnx/model.onnx", "tokenizer.json", "1_Pooling/config.json", "modules.json"} <= fetched
    assert (path / COMPLETE_MARK).is_file()
    assert "fetching 14 files into" in caplog.text and "fetched in" in caplog.text  # progress, by line

    offline = FakeHub({}, offline=True)
    assert fetch_hub_model(REPO, None, tmp_path, snapshot=offline) == path
    assert offline.calls == []  # a second start does not ask the hub
    assert "using the copy in" in caplog.text


def test_a_known_repository_is_fetched_by_its_preset_at_the_pinned_revision(tmp_path):
    preset = PRESETS["bge-m3"]
    source = tmp_path / "repo"
    for name in (*preset.files, "pytorch_model.bin"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(b"x")
    hub = FakeHub({preset.repo_id: {"abc123": source}})
    path = fetch_hub_model(preset.repo_id, "abc123", tmp_path / "cache", snapshot=hub)
    assert path.parts[-2:] == ("BAAI--bge-m3", "abc123")
    assert hub.calls[0]["patterns"] == list(preset.files) and hub.calls[0]["revision"] == "abc123"
    assert not (path / "pytorch_model.bin").exists()


@pytest.mark.parametrize(
    ("repos", "revision", "offline", "says"),
    [
        (
            {},
            None,
            False,
            "no such repository on the Hugging Face hub (a private or gated one needs HF_TOKEN)",
        ),
        ({REPO: "main"}, "v9", False, "no revision 'v9' in the repository on the Hugging Face hub"),
        (
            {REPO: "main"},
            None,
            True,
            "cannot reach the Hugging Face hub (no network, or HF_HUB_OFFLINE=1) and nothing is cached yet",
        ),
    ],
)
def test_fetch_failures_are_one_line_with_the_needed_files(tmp_path, st_repo, repos, revision, offline, says):
    hub = FakeHub({repo: {rev: st_repo.path} for repo, rev in repos.items()}, offline=offline)
    with pytest.raises(ModelLoadError) as info:
        fetch_hub_model(REPO, revision, tmp_path, snapshot=hub, label=f"--model st=hf:{REPO}")
    message = str(info.value)
    needs = "tokenizer.json, config.json and model.onnx or onnx/model.onnx"
    assert message == f"--model st=hf:{REPO}: {says} (the model needs {needs})"
    assert not (hub_cache_path(tmp_path, REPO, revision) / COMPLETE_MARK).exists()


def test_a_repository_without_what_the_family_needs_is_refused_and_retried_next_time(tmp_path, st_repo):
    broken = tmp_path / "broken"
    shutil.copytree(st_repo.path, broken)
    (broken / "onnx" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"the repository lacks model\.onnx or onnx/model\.onnx"):
        fetch_hub_model(REPO, None, tmp_path / "cache", snapshot=FakeHub({REPO: {"main": broken}}))
    hub = FakeHub({REPO: {"main": st_repo.path}})  # fixed upstream: not marked complete, so fetched again
    fetch_hub_model(REPO, None, tmp_path / "cache", snapshot=hub)
    assert len(hub.calls) == 1

    preset = PRESETS["jina-v3"]
    partial = tmp_path / "jina"
    for name in preset.files[:-1]:
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"lacks onnx/model\.onnx_data \(the model needs config\.json, "):
        fetch_hub_model(
            preset.repo_id, None, tmp_path / "cache", snapshot=FakeHub({preset.repo_id: {"main": partial}})
        )


def test_the_server_serves_a_fetched_model_offline(tmp_path, st_repo):
    cache = tmp_path / "cache"
    fetch_hub_model(
        REPO, "v1", cache, snapshot=FakeHub({REPO: {"v1": st_repo.path}})
    )  # the first start's fetch
    server = start_server(
        "--model", f"st=hf:{REPO}@v1", "--model-alias", "tiny=st",
        "--cache-dir", str(cache), "--sessions", "1",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    try:
        texts = ["a small hub model", "served from the cache"]
        reply = server.stub().Embed(pb.EmbedRequest(inputs=texts, model="tiny"), timeout=60)
        reference = SentenceTransformersReference(st_repo)
        for vector, text in zip(reply.embeddings, texts, strict=True):
            np.testing.assert_allclose(vector.dense.values, reference.dense(text), atol=2e-5)
        assert server.logged("using the copy in")
    finally:
        server.stop()


def test_a_repository_never_fetched_stops_an_offline_server_with_one_line(tmp_path):
    command = server_command(
        [
            "--host", "127.0.0.1", "--port", str(free_port()), "--rest-port", "0", "--log-level", "warning",
            "--model", "st=hf:example-org/not-cached", "--cache-dir", str(tmp_path),
        ]
    )  # fmt: skip
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 1
    assert lines == [
        "embedding-server: error: --model st=hf:example-org/not-cached: cannot reach the Hugging Face hub "
        "(no network, or HF_HUB_OFFLINE=1) and nothing is cached yet "
        "(the model needs tokenizer.json, config.json and model.onnx or onnx/model.onnx)"
    ]


def test_an_unwritable_cache_is_one_line_naming_the_flag(tmp_path, st_repo):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    hub = FakeHub({REPO: {"main": st_repo.path}})
    with pytest.raises(
        ModelLoadError, match=r"^hf:example-org/tiny-st: cannot write .*; give a writable --cache-dir$"
    ):
        fetch_hub_model(REPO, None, not_a_directory, snapshot=hub)
    assert hub.calls == []


def test_embedding_quantize_takes_a_hub_id_from_the_servers_cache(tmp_path, st_repo, monkeypatch, capsys):
    """``embedding-quantize hf:ORG/REPO``: the model comes from the cache the server fetched it into."""
    cache = tmp_path / "cache"
    fetch_hub_model(REPO, None, cache, snapshot=FakeHub({REPO: {"main": st_repo.path}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # only the cache: nothing may be fetched now
    destination = tmp_path / "tiny-st-int8"
    args = [f"hf:{REPO}", str(destination), "--texts", "40", "--cache-dir", str(cache), "--force"]
    assert quantize_cli(args) == 0, capsys.readouterr().err
    assert (destination / "onnx" / "model.onnx").is_file()  # where the fetched repository had it
    assert locate(destination).onnx == destination / "onnx" / "model.onnx"  # as the server finds it
    assert quantize_cli([f"hf:{REPO}@v9", str(tmp_path / "other"), "--cache-dir", str(cache)]) == 1
    assert f"embedding-quantize hf:{REPO}@v9:" in capsys.readouterr().err  # one line naming the argument
