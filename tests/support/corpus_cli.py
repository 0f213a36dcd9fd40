"""Running the embedding-client CLI in a subprocess: to its end, or killed partway."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support.replies import raw_dense
from tests.support.server import RunningServer

N = 480  # records in the corpus test_corpus_cli and test_corpus_parquet embed


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "embedding_client.cli", *args]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI; if it hangs, fail with every thread's stack (faulthandler on SIGABRT)."""
    command = [sys.executable, "-X", "faulthandler", *cli(*args)[1:]]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        stdout, stderr = process.communicate()
        pytest.fail(f"embedding-client {' '.join(args)} hung:\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def kill_mid_run(args: list[str], partial: Path, min_bytes: int) -> None:
    """Start the CLI, SIGKILL it once its partial output holds ``min_bytes``."""
    process = subprocess.Popen(cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if partial.exists() and partial.stat().st_size >= min_bytes:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"


def unary_vectors(server: RunningServer, texts: list[str]) -> np.ndarray:
    """What unary Embed calls of 120 texts answer for ``texts``: what a corpus run must write."""
    stub = server.stub()
    parts = [
        stub.Embed(pb.EmbedRequest(inputs=texts[i : i + 120]), timeout=120) for i in range(0, len(texts), 120)
    ]
    return np.concatenate([raw_dense(part) for part in parts])
