"""embedding-download asks the hub for exactly the files the loader reads (the hub itself is faked)."""

from __future__ import annotations

from pathlib import Path

import pytest
from embedding_server.download import PRESETS, download
from embedding_server.models.files import locate


def fake_hub(calls: list[dict], skip: str | None = None):
    def snapshot_download(
        *, repo_id: str, revision: str | None, local_dir: str, allow_patterns: list[str]
    ) -> str:
        calls.append({"repo_id": repo_id, "revision": revision, "patterns": allow_patterns})
        for pattern in allow_patterns:
            if pattern != skip:
                (Path(local_dir) / pattern).parent.mkdir(parents=True, exist_ok=True)
                (Path(local_dir) / pattern).write_bytes(b"x")
        return local_dir

    return snapshot_download


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_download_fetches_a_directory_the_loader_accepts(tmp_path, name):
    calls: list[dict] = []
    path = download(name, tmp_path / name, revision="v1", snapshot=fake_hub(calls))
    assert calls[0]["repo_id"] == PRESETS[name].repo_id and calls[0]["revision"] == "v1"
    assert not any(p.endswith((".safetensors", ".bin")) for p in calls[0]["patterns"])  # no torch weights
    files = locate(path)
    assert files.onnx == path / "onnx" / "model.onnx"
    assert (path / "onnx" / "model.onnx_data").is_file()


def test_bge_m3_download_includes_heads_and_baai_external_file(tmp_path):
    calls: list[dict] = []
    download("bge-m3", tmp_path, snapshot=fake_hub(calls))
    assert {"sparse_linear.pt", "colbert_linear.pt", "onnx/Constant_7_attr__value"} <= set(
        calls[0]["patterns"]
    )


def test_incomplete_download_is_an_error_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"onnx/model\.onnx_data"):
        download("jina-v3", tmp_path, snapshot=fake_hub([], skip="onnx/model.onnx_data"))
