"""``embedding-client`` as a user runs it: a real process against real servers.

The corpus outputs are checked against the server's raw unary answers; the
resume test kills the CLI with SIGKILL mid-run (and tears the last row on
purpose), reruns it, and compares the bytes with an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from embedding_client.corpus_formats import count_records, read_records
from embedding_client.corpus_input import CorpusInputError
from embedding_client.proto import embedding_pb2 as pb

from tests.support.corpus_cli import N, cli, kill_mid_run, run_cli, unary_vectors
from tests.support.launch import launch, wait_serving
from tests.support.replies import raw_dense
from tests.support.server import RunningServer, free_port
from tests.support.texts import sentence


def write_corpus(path: Path, count: int) -> list[str]:
    texts = [sentence(i) for i in range(count)]
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            record_id = i if i % 2 else f"doc-{i}"  # ids of any JSON type come back as given
            f.write(json.dumps({"id": record_id, "text": text, "lang": "en"}) + "\n")
            if i == 5:
                f.write("\n")  # blank lines are skipped
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return path, write_corpus(path, N)


@pytest.fixture(scope="module")
def expected(default_server: RunningServer, corpus) -> np.ndarray:
    return unary_vectors(default_server, corpus[1])


def test_corpus_to_npy_and_jsonl(default_server, corpus, expected, tmp_path):
    source, _ = corpus
    npy, jsonl = tmp_path / "vectors.npy", tmp_path / "vectors.jsonl"
    for output in (npy, jsonl):
        done = run_cli("corpus", str(source), str(output), "--target", default_server.target, "--no-progress")
        assert done.returncode == 0, done.stderr
        assert f"{N} records" in done.stderr
        assert not Path(f"{output}.partial").exists() and not Path(f"{output}.partial.json").exists()
    vectors = np.load(npy)
    assert vectors.dtype == np.float32 and vectors.shape == (N, 384)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["id"] for line in lines] == [i if i % 2 else f"doc-{i}" for i in range(N)]
    np.testing.assert_array_equal(np.array([line["embedding"] for line in lines], dtype=np.float32), vectors)
    again = run_cli("corpus", str(source), str(npy), "--target", default_server.target)
    assert again.returncode == 0 and "nothing to do" in again.stderr


def test_progress_bar_shows_rate_and_eta(default_server, tmp_path):
    source = tmp_path / "small.jsonl"
    write_corpus(source, 40)
    done = run_cli("corpus", str(source), str(tmp_path / "small.npy"), "--target", default_server.target)
    assert done.returncode == 0, done.stderr
    assert "40/40" in done.stderr and "items/s" in done.stderr and "<" in done.stderr  # elapsed<remaining


@pytest.mark.parametrize("suffix", [".npy", ".jsonl"])
def test_an_interrupted_run_resumes_to_an_identical_file(default_server, corpus, tmp_path, suffix):
    source, _ = corpus
    flags = ["--target", default_server.target, "--batch-size", "8", "--window", "2", "--no-progress"]
    flags += ["--length-sort", "40"]  # sorted blocks of 40 rows: written a block at a time
    whole = tmp_path / f"whole{suffix}"
    assert run_cli("corpus", str(source), str(whole), *flags).returncode == 0
    reference = whole.read_bytes()

    resumed = tmp_path / f"resumed{suffix}"
    partial = Path(f"{resumed}.partial")
    kill_mid_run(["corpus", str(source), str(resumed), *flags], partial, len(reference) // 3)
    assert not resumed.exists() and 0 < partial.stat().st_size < len(reference)
    size = partial.stat().st_size
    assert reference.startswith(partial.read_bytes())  # what it wrote so far is the same bytes
    with open(partial, "ab") as torn:  # as if killed in the middle of a write: a prefix of what follows
        torn.write(reference[size : size + 777])

    changed = run_cli("corpus", str(source), str(resumed), *flags, "--dimensions", "32")
    assert changed.returncode == 1 and "other settings" in changed.stderr  # never mixes two runs' vectors

    finish = run_cli("corpus", str(source), str(resumed), *flags)
    assert finish.returncode == 0, finish.stderr
    assert "resuming:" in finish.stderr
    skipped = int(finish.stderr.split("resuming: ")[1].split(" of ")[0])
    assert 0 < skipped < N
    assert f"{N - skipped} embedded" in finish.stderr  # only the rest was sent
    assert resumed.read_bytes() == reference


def test_corpus_survives_a_server_restart(corpus, expected, tmp_path):
    source, _ = corpus
    port = free_port()
    first = wait_serving(launch(port))
    second = None
    output = tmp_path / "restart.npy"
    small_requests = ["--batch-size", "8", "--length-sort", "32"]
    process = subprocess.Popen(
        cli("corpus", str(source), str(output), "--target", f"127.0.0.1:{port}", *small_requests),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        partial = Path(f"{output}.partial")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size > 100_000):
            time.sleep(0.01)  # about 65 rows written
        first.process.send_signal(signal.SIGKILL)  # the server dies mid-corpus...
        first.process.wait(10)
        second = launch(port)  # ...and comes back on the same address
        _, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr
        reconnects = int(re.search(r"(\d+) stream\(s\) re-established", stderr).group(1))
        assert reconnects >= 1
        np.testing.assert_allclose(np.load(output), expected, atol=1e-6)
    finally:
        if process.poll() is None:
            process.kill()
        first.stop()
        if second is not None:
            second.stop()


def test_bad_input_names_the_line_and_keeps_what_was_written(default_server, tmp_path):
    source = tmp_path / "bad.jsonl"
    lines = [json.dumps({"id": i, "text": f"text {i}"}) for i in range(30)]
    lines[20] = '{"id": 20, "txt": "typo"}'
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "bad.jsonl.out.jsonl"
    flags = ["--target", default_server.target, "--batch-size", "4"]
    failed = run_cli("corpus", str(source), str(output), *flags)
    assert failed.returncode == 1
    assert f'{source}:21: missing "text"' in failed.stderr
    written = Path(f"{output}.partial").read_text().splitlines()
    assert [json.loads(line)["id"] for line in written] == list(range(20))  # everything before it


def test_no_truncate_refuses_an_over_long_text(default_server, tmp_path):
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps({"id": 1, "text": "word " * 600}) + "\n")
    flags = ["--target", default_server.target, "--no-progress"]
    refused = run_cli("corpus", str(source), str(tmp_path / "long.npy"), *flags, "--no-truncate")
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "inputs[0]" in refused.stderr
    accepted = run_cli("corpus", str(source), str(tmp_path / "long2.npy"), *flags)
    assert accepted.returncode == 0 and np.load(tmp_path / "long2.npy").shape == (1, 384)


def test_unknown_output_format(tmp_path, corpus):
    source, _ = corpus
    wrong = run_cli("corpus", str(source), str(tmp_path / "out.csv"), "--target", "127.0.0.1:1")
    assert wrong.returncode == 2 and ".jsonl" in wrong.stderr


def test_embed_and_models_commands(default_server):
    target = ["--target", default_server.target]
    raw = raw_dense(default_server.stub().Embed(pb.EmbedRequest(inputs=["hello world"]), timeout=30))[0]
    shown = run_cli("embed", "hello world", *target)
    assert shown.returncode == 0 and "d=384" in shown.stdout and "norm=1.0000" in shown.stdout
    as_json = run_cli("embed", "hello world", "--json", "--output", "dense", "--output", "binary", *target)
    row = json.loads(as_json.stdout)
    np.testing.assert_array_equal(np.array(row["embedding"], dtype=np.float32), raw)
    assert row["binary_embedding"] == np.packbits(raw > 0).tolist()
    models = run_cli("models", *target)
    assert models.returncode == 0 and "all-minilm-l6-v2 (default)" in models.stdout
    listed = json.loads(run_cli("models", "--json", *target).stdout)
    assert listed[0]["dimensions"] == 384 and listed[0]["outputs"] == ["dense", "binary"]
    missing = run_cli("embed", "x", "--model", "nope", *target)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr


def test_environment_supplies_target(default_server):
    env = {**os.environ, "EMBEDDING_TARGET": default_server.target}
    listed = subprocess.run(cli("models"), capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0 and "all-minilm-l6-v2" in listed.stdout


def test_reading_records(tmp_path):
    source = tmp_path / "r.jsonl"
    source.write_text('{"id": "a", "text": "x"}\n\n   \n{"text": "y"}\n[1]\n')
    assert count_records(source) == 3
    records = read_records(source, skip=1)
    assert next(records).text == "y"
    with pytest.raises(CorpusInputError, match=r":5: expected a JSON object"):
        next(records)


@pytest.mark.parametrize(
    ("outcome", "code", "stderr"),
    [
        (3, 3, ""),
        (SystemExit(2), 2, ""),
        (SystemExit("bad flag"), 1, "bad flag\n"),
        (SystemExit(None), 0, ""),
    ],
)
def test_the_command_exits_with_mains_status_without_finalizing(monkeypatch, capsys, outcome, code, stderr):
    """``embedding-client`` (cli.run) ends in os._exit, so no garbage collection of gRPC calls at
    interpreter shutdown can hang it; the status is main's, or what sys.exit would have made of it."""
    from embedding_client import cli as cli_module

    class Exited(Exception):
        pass

    def main() -> int:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def exit_now(status: int) -> None:
        raise Exited(status)

    monkeypatch.setattr(cli_module, "main", main)
    monkeypatch.setattr(cli_module.os, "_exit", exit_now)
    with pytest.raises(Exited) as exited:
        cli_module.run()
    assert exited.value.args == (code,)
    assert capsys.readouterr().err == stderr
