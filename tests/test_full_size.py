"""A full-size jina-v3-shaped model end to end, under the memory limit deploy/ gives it.

Not in the default suite (marker ``full_size``: 24 layers at hidden 1024 run an
8192-token window in about two minutes on 2 cores): ``make test-full-size``, or
``pytest -m full_size tests/test_full_size.py``. The model is the synthetic
full-size export of tests/support/xlmr.py, built once into the cache.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from embedding_client.proto import embedding_pb2 as pb

from tests.support.error_details import call_status, check_error_info
from tests.support.server import RunningServer, start_server
from tests.support.xlmr import JINA_V3, deployed, full_size_dir

pytestmark = [pytest.mark.full_size, pytest.mark.timeout(3600)]  # minutes per test, not the suite's 300 s

#: docker/compose.large.yaml's (and deploy/kubernetes/models/jina-v3's) limit and flags.
LIMIT_MIB, DEPLOYED_FLAGS = deployed()
FLAGS = (*DEPLOYED_FLAGS, "--max-message-mb", "64")
WINDOW = 8192


def peak_rss_mib(server: RunningServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def words(count: int, seed: int) -> list[str]:
    """Synthetic-vocabulary words: each one token, so ``count`` words are ``count`` tokens."""
    from tests.support.synthetic import WORDS

    return [WORDS[(seed * 31 + i * 7) % len(WORDS)] for i in range(count)]


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    model = full_size_dir(JINA_V3)
    running = start_server(
        "--model", f"jina-v3={model}", "--memory-limit", f"{LIMIT_MIB}MiB", *FLAGS, timeout=600
    )
    yield running
    running.stop()


def token_count(stub: object, text: str) -> int:
    reply = stub.Tokenize(pb.TokenizeRequest(inputs=[text]), timeout=60)  # type: ignore[attr-defined]
    return len(reply.results[0].ids)


def fitted(stub: object, tokens: int, seed: int) -> str:
    """The longest prefix of synthetic words with at most ``tokens`` tokens (specials included)."""
    pool = words(tokens, seed)
    low, high = 1, len(pool)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (
            (middle, high) if token_count(stub, " ".join(pool[:middle])) <= tokens else (low, middle - 1)
        )
    return " ".join(pool[:low])


def test_a_full_window_and_a_32k_late_chunked_document_run_under_the_limit(server: RunningServer):
    stub = server.stub()
    window = fitted(stub, WINDOW, seed=1)
    assert token_count(stub, window) >= WINDOW - 2
    reply = stub.Embed(pb.EmbedRequest(inputs=[window]), timeout=1800)  # the task Tokenize counted with
    assert len(reply.embeddings) == 1 and len(reply.embeddings[0].dense.values) == 1024
    assert reply.usage.prompt_tokens >= WINDOW - 2

    document = words(32768, seed=2)
    chunks = [" ".join(document[i : i + 256]) for i in range(0, len(document), 256)]
    late = stub.Embed(pb.EmbedRequest(inputs=chunks, late_chunking=True), timeout=3600)
    assert [e.index for e in late.embeddings] == list(range(len(chunks)))
    assert late.usage.prompt_tokens >= 32768  # the document's tokens (5 overlapping windows ran)
    peak = peak_rss_mib(server)
    assert peak < LIMIT_MIB, f"peak RSS {peak:.0f} MiB over the {LIMIT_MIB} MiB limit"
    print(f"full-size jina-v3: peak RSS {peak:.0f} MiB under --memory-limit {LIMIT_MIB} MiB")


def test_a_window_a_smaller_limit_cannot_hold_is_refused_naming_the_limit_it_needs():
    model = full_size_dir(JINA_V3)
    small = start_server("--model", f"jina-v3={model}", "--memory-limit", "3GiB", *FLAGS, timeout=600)
    try:
        stub = small.stub()
        window = fitted(stub, WINDOW, seed=3)
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(inputs=["short", window]), timeout=600)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        needed = re.search(r"needs a memory limit of about (\d+)MiB", info.value.details())
        assert needed and 3072 < int(needed.group(1)) <= LIMIT_MIB, info.value.details()
        check_error_info(call_status(info.value), "MEMORY_LIMIT", "inputs", 1)
        assert stub.Embed(pb.EmbedRequest(inputs=["still serving"]), timeout=600).embeddings
    finally:
        small.stop()
