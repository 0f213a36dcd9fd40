"""An interrupted ``embedding-client corpus`` keeps the rows that were done; the rerun finishes the file.

The CLI runs as a user runs it, with the default ``--length-sort`` (4096), on
a corpus four look-aheads long, against a real server on a tiny synthetic
sentence-transformers model (thousands of texts a second, so a full run takes
seconds). Every text is ten whole words of the model's vocabulary: twelve
tokens each, so the server pads every batch alike and its vectors are the
same bits however it batches them (which makes byte-for-byte comparison of a
resumed file with an uninterrupted one meaningful), while their lengths in
characters (32-88) differ, so the client's length sort does reorder them.

Interrupting mid-run without timing: the test freezes the server (SIGSTOP)
before each look at the partial output and only lets it go on (SIGCONT) if
no row is there yet. Once rows are seen, the server stays frozen while the
CLI gets its signal, so nothing more can come back than was already sent:
at most the look-ahead (4096) plus the requests in flight (64 x 64) past
the rows seen, far from the 16384 of the corpus. The run cannot finish before
the signal, on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from embedding_client import EmbeddingClient
from embedding_client.cli import DEFAULT_LENGTH_SORT, Interrupted, StopOnSignal
from embedding_client.cli import main as cli_main
from embedding_client.core import DEFAULT_WINDOW
from embedding_client.corpus import CorpusJob, run_corpus
from embedding_client.length_sort import Reorder, sorted_requests
from embedding_client.requests import DEFAULT_BATCH_SIZE
from embedding_client.results import Embeddings

from tests.support.corpus_cli import run_cli
from tests.support.polling import until_sync
from tests.support.server import RunningServer, start_server
from tests.support.synthetic import WORDS, make_sentence_transformers

N = 4 * DEFAULT_LENGTH_SORT
#: What can still come back once the server is frozen: the look-ahead and the requests in flight
#: (the stream's default max_ahead, 2 x the window, of DEFAULT_BATCH_SIZE texts).
MOST_AFTER_FREEZE = DEFAULT_LENGTH_SORT + 2 * DEFAULT_WINDOW * DEFAULT_BATCH_SIZE


def text(i: int) -> str:
    """Ten vocabulary words (twelve tokens), 32-88 characters."""
    return " ".join(WORDS[(i * 31 + k * (1 + i % 17)) % len(WORDS)] for k in range(10))


def record_id(i: int) -> object:
    return i if i % 3 else f"doc-{i}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    model = make_sentence_transformers(tmp_path_factory.mktemp("st") / "st", pooling="mean", normalize=True)
    running = start_server("--model", f"st={model.path}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(N):
            f.write(json.dumps({"id": record_id(i), "text": text(i)}) + "\n")
    return path


def complete_rows(partial: Path) -> int:
    """Complete rows in a partial .jsonl or .npy output, read without touching it (the CLI writes on)."""
    if not partial.exists():
        return 0
    if partial.name.endswith(".jsonl.partial"):
        return partial.read_bytes().count(b"\n")
    with open(partial, "rb") as data:
        try:
            np.lib.format.read_magic(data)
            shape, _, _ = np.lib.format.read_array_header_1_0(data)
        except (ValueError, OSError, EOFError):
            return 0  # the header is not all there yet
        return (os.fstat(data.fileno()).st_size - data.tell()) // (4 * shape[1])


FOREGROUND_CLI = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('embedding_client.cli', run_name='__main__', alter_sys=True)"
)


def interrupt_mid_run(server: RunningServer, args: list[str], partial: Path, signum: int) -> tuple[int, str]:
    """Start the CLI, freeze the server once rows are written, signal the CLI; its exit status and stderr."""
    # As a terminal's foreground job: SIGINT at its default even when the tests run as a background job
    # (`cmd &` starts with SIGINT ignored, the CLI keeps it so, and this test would wait in vain).
    # faulthandler: a hang dumps every thread's stack on SIGABRT.
    command = [sys.executable, "-X", "faulthandler", "-c", FOREGROUND_CLI, *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    frozen = False

    def frozen_with_rows() -> bool:
        """Freeze the server, then look: rows there, it stays frozen; none yet, it goes on."""
        nonlocal frozen
        assert process.poll() is None, "the run ended before it could be interrupted"
        server.process.send_signal(signal.SIGSTOP)
        frozen = True
        if complete_rows(partial):
            return True
        server.process.send_signal(signal.SIGCONT)
        frozen = False
        return False

    try:
        until_sync(frozen_with_rows, "rows in the partial output")
        seen = complete_rows(partial)
        # the CLI may still read replies already sent, never more than this: it cannot finish
        assert seen + MOST_AFTER_FREEZE < N, f"{seen} rows seen: too late to prove anything"
        process.send_signal(signum)
        try:
            _, stderr = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, stacks = process.communicate(timeout=30)
            pytest.fail(f"the CLI did not stop within 120 s of {signal.Signals(signum).name}:\n{stacks}")
    finally:
        if frozen:
            server.process.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr


@pytest.mark.parametrize(("signum", "suffix"), [(signal.SIGINT, ".jsonl"), (signal.SIGTERM, ".npy")])
def test_an_interrupted_run_keeps_the_rows_done_and_resumes_to_an_identical_file(
    server: RunningServer, corpus: Path, tmp_path: Path, signum: int, suffix: str
) -> None:
    flags = ["--target", server.target, "--no-progress"]  # the default --length-sort and window
    whole = tmp_path / f"whole{suffix}"
    done = run_cli("corpus", str(corpus), str(whole), *flags)
    assert done.returncode == 0, done.stderr
    reference = whole.read_bytes()

    output = tmp_path / f"resumed{suffix}"
    partial = Path(f"{output}.partial")
    status, stderr = interrupt_mid_run(server, ["corpus", str(corpus), str(output), *flags], partial, signum)
    name = signal.Signals(signum).name
    assert status == 128 + signum, stderr  # 130 for SIGINT, 143 for SIGTERM
    assert f"stopped by {name}; rerun the same command to resume" in stderr
    saved = int(stderr.split("stopped: ")[1].split(" of ")[0])
    assert f"stopped: {saved} of {N} records are saved in {partial}" in stderr
    assert 0 < saved < N and complete_rows(partial) == saved  # rows kept, and the run was cut mid-way
    kept = partial.read_bytes()
    assert reference.startswith(kept)  # a prefix of the uninterrupted file: the first inputs, in order
    if suffix == ".jsonl":
        assert [json.loads(line)["id"] for line in kept.splitlines()] == [record_id(i) for i in range(saved)]

    finish = run_cli("corpus", str(corpus), str(output), *flags)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming: {saved} of {N} records already in {partial}" in finish.stderr
    assert f"{N - saved} embedded" in finish.stderr  # only the rest was sent
    assert output.read_bytes() == reference
    if suffix == ".jsonl":
        ids = [json.loads(line)["id"] for line in output.read_text().splitlines()]
        assert ids == [record_id(i) for i in range(N)]


def test_progress_and_rows_follow_each_reply(server: RunningServer, corpus: Path, tmp_path: Path) -> None:
    """The corpus run reports after every reply; rows are written long before a look-ahead is done."""
    replies: list[tuple[int, int]] = []
    job = CorpusJob(
        input=corpus, output=tmp_path / "out.npy", length_sort=DEFAULT_LENGTH_SORT, progress=False, streams=1
    )
    with EmbeddingClient(server.target) as client:
        summary = run_corpus(client, job, log=lambda _: None, on_reply=lambda *counts: replies.append(counts))
    assert summary.embedded == N
    first_embedded, first_written = replies[0]
    assert first_embedded <= job.batch_size and first_written >= 1  # the first reply is written at once
    assert len(replies) >= N // job.batch_size  # one report per request, not per look-ahead
    written = [w for _, w in replies]
    assert written == sorted(written) and written[-1] == N
    # the rows held back for order never reach the look-ahead
    assert max(embedded - written for embedded, written in replies) < DEFAULT_LENGTH_SORT
    assert replies[-1] == (N, N)


# --- the sliding look-ahead and the reorder buffer, without a server ------------------------------------


@pytest.mark.parametrize(("batch_size", "lookahead"), [(64, 4096), (7, 50), (5, 5), (3, 1)])
def test_requests_anchor_on_the_oldest_and_the_buffer_stays_under_the_lookahead(
    batch_size: int, lookahead: int
) -> None:
    rng = np.random.default_rng(batch_size)
    texts = ["x" * int(n) for n in rng.integers(1, 400, size=3 * lookahead + 17)]
    plans: deque[np.ndarray] = deque()
    reorder = Reorder(plans)
    handed_out: list[int] = []
    sent: set[int] = set()
    for request in sorted_requests(iter(texts), batch_size, lookahead, plans):
        positions = plans[-1]
        oldest = min(set(range(len(texts))) - sent)
        assert oldest in positions  # every request carries the oldest unsent text...
        assert max(positions) < oldest + lookahead  # ...and nothing past the look-ahead
        assert [texts[p] for p in positions] == request and len(request) <= batch_size
        sent.update(positions.tolist())
        # a reply whose vector rows are their own positions
        reply = Embeddings(count=len(request), dense=positions.astype(np.float32)[:, None])
        chunk = reorder.add(reply)
        assert chunk is not None  # every reply finishes its anchor, so the prefix always grows
        assert chunk.offset == len(handed_out)
        handed_out.extend(int(v) for v in chunk.dense[:, 0])
        held = sum(len(p) for p, _ in reorder.held)
        assert held == reorder.received - len(handed_out) < lookahead
    assert handed_out == list(range(len(texts)))
    assert not reorder.held and not plans


def test_a_second_signal_waits_for_the_save_and_a_third_quits(capsys):
    """The first signal stops the run; a second during the save is noted, not raised (the "saved"
    line still comes); a third quits at once, with the signal's status."""
    handler = StopOnSignal()
    with pytest.raises(Interrupted) as info:
        handler(signal.SIGTERM, None)
    assert info.value.signum == signal.SIGTERM
    handler(signal.SIGINT, None)  # returns: the save goes on
    assert "saving what is done" in capsys.readouterr().err
    third = (
        "import signal\nfrom embedding_client.cli import StopOnSignal\n"
        "handler = StopOnSignal()\nhandler.seen = 2\nhandler(signal.SIGINT, None)\nprint('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", third], capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "not reached" not in result.stdout


def test_the_cli_gives_back_the_signal_handlers_it_replaced(default_server):
    """main() run in-process (a test, a notebook) leaves its caller's SIGINT handler as it was."""
    before = signal.getsignal(signal.SIGINT)
    assert cli_main(["models", "--target", default_server.target]) == 0
    assert signal.getsignal(signal.SIGINT) is before
