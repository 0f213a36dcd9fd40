"""Late chunking beyond the model's window, through real servers, against an independent reference.

A synthetic jina-v3 with a 16-token window (14 content tokens a window) makes
documents of 2, 3 and 10 windows a few dozen tokens long. Every vector is
compared with ``JinaV3Reference.long_late_chunks`` (tests/support/reference.py),
which runs each window on its own in numpy and takes each token's state from
the window that keeps it, written from models.md's rule, not from the
server's code. Each word of the synthetic vocabulary is one token, so a
document's token count and its windows are known from its words.

Server A serves the small-window model and a 64-token one with
``--late-chunking-overlap 5``; server B the small one with the default overlap
(256, so half a window) and ``--max-document-tokens 100``, and the REST shim.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from embedding_client.corpus import CorpusJob
from embedding_client.proto import embedding_pb2 as pb
from embedding_server.compose import engine_settings
from embedding_server.engine.embedder import Embedder
from embedding_server.engine.jobs import EmbedJob
from embedding_server.engine.tuning import EngineSettings
from embedding_server.models.late_chunking import content_windows, plan_document
from embedding_server.models.loader import LoadedModel, ModelSpec, load
from embedding_server.models.tokenization import TokenizedText
from embedding_server.settings import parse_settings

from tests.support import minilm_reference
from tests.support.corpus_cli import run_cli
from tests.support.instrumented import CountingSessions
from tests.support.reference import (
    COSINES,
    JinaV3Reference,
    ReferenceTokenizer,
    assert_binary_matches,
    backbone_states,
    cosine,
    late_chunk_spans,
    normalize,
    windowed_states,
)
from tests.support.server import RunningServer, start_server
from tests.support.synthetic import JINA_HIDDEN, JINA_MAX_TOKENS, WORDS, JinaV3Dir, make_jina_v3

SMALL_WINDOW = 16  # tokens a window, <s> and </s> included
CAPACITY = SMALL_WINDOW - 2  # content tokens a window
OVERLAP = 5  # server A's --late-chunking-overlap
DEFAULT_OVERLAP = 256  # server B: min(256, 14 // 2) = 7
DOCUMENT_LIMIT = 100  # server B's --max-document-tokens
SEPARATION = pb.TASK_SEPARATION  # no instruction prefix: N = the number of words
LOWER_WORDS = [w for w in WORDS if w.isalpha() and w.islower()]


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, JinaV3Dir]:
    root = tmp_path_factory.mktemp("late-chunking")
    return {
        "small": make_jina_v3(root / "jina-small-window", seed=21, max_tokens=SMALL_WINDOW),
        "jina": make_jina_v3(root / "jina-v3-tiny", seed=3),
    }


@pytest.fixture(scope="module")
def refs(models: dict[str, JinaV3Dir]) -> dict[str, JinaV3Reference]:
    return {name: JinaV3Reference(model) for name, model in models.items()}


@pytest.fixture(scope="module")
def server_a(models: dict[str, JinaV3Dir]) -> Iterator[RunningServer]:
    args = [arg for name, model in models.items() for arg in ("--model", f"{name}={model.path}")]
    running = start_server(*args, "--late-chunking-overlap", str(OVERLAP), "--max-batch-wait-ms", "5")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def server_b(models: dict[str, JinaV3Dir]) -> Iterator[RunningServer]:
    running = start_server(
        "--model", f"small={models['small'].path}", "--max-document-tokens", str(DOCUMENT_LIMIT), rest=True
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server_a: RunningServer):
    return server_a.stub()


@pytest.fixture(scope="module", autouse=True)
def report_cosines() -> Iterator[None]:
    yield
    print("\nmin cosine:", COSINES.report())


def words(rng: np.random.Generator, count: int) -> str:
    return " ".join(rng.choice(LOWER_WORDS, size=count))


def document(seed: int, content_tokens: int, long_chunk: int = 0) -> list[str]:
    """Chunks of 1-6 words (one token each) totalling ``content_tokens``; optionally one long chunk."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    remaining = content_tokens - long_chunk
    while remaining > 0:
        sizes.append(min(int(rng.integers(1, 7)), remaining))
        remaining -= sizes[-1]
    if long_chunk:
        sizes.insert(len(sizes) // 2, long_chunk)
    return [words(rng, size) for size in sizes]


def tokens_for_windows(windows: int, overlap: int = OVERLAP) -> int:
    """Content tokens N that make exactly ``windows`` windows (with room to spare at both ends)."""
    if windows == 1:
        return CAPACITY - 2
    step = CAPACITY - min(overlap, CAPACITY // 2)
    return CAPACITY + (windows - 1) * step - 2


def embed(stub, **fields) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(**fields), timeout=60)


def dense_rows(response: pb.EmbedResponse) -> list[np.ndarray]:
    return [np.array(e.dense.values, np.float64) for e in response.embeddings]


def check_against_reference(label: str, rows: list[np.ndarray], expected: list[np.ndarray]) -> None:
    assert len(rows) == len(expected)
    for row, want in zip(rows, expected, strict=True):
        COSINES.check(label, row, want)


# --- the window plan (pure) ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 13, 14, 15, 23, 24, 100, 401])
@pytest.mark.parametrize("overlap", [0, 3, 7, 256])
def test_windows_cover_the_document_and_keep_each_token_once(n, overlap):
    """The plan of a tokenized document, without a model: ids, kept rows, stitched length."""
    ids = np.array([0, *range(10, 10 + n), 2], np.int64)
    text = TokenizedText(ids, [(0, 0)] * (n + 2), np.array([True] + [False] * n + [True]))
    plan = plan_document(text, [(0, n + 2)], SMALL_WINDOW, overlap)
    windows = content_windows(n, CAPACITY, overlap)
    assert windows[0][0] == 0 and windows[-1][1] == n
    assert len(plan.windows) == len(windows)
    stitched = []
    for window, (start, end) in zip(plan.windows, windows, strict=True):
        assert len(window.ids) <= SMALL_WINDOW
        assert window.ids[0] == 0 and window.ids[-1] == 2  # every window is <s> ... </s>
        np.testing.assert_array_equal(window.ids[1:-1], ids[1 + start : 1 + end])
        stitched.extend(window.ids[window.keep[0] : window.keep[1]].tolist())
    assert stitched == ids.tolist()  # each token from exactly one window, in order
    if n + 2 <= SMALL_WINDOW:  # one window: exactly today's sequence, all of it kept
        assert len(plan.windows) == 1 and plan.windows[0].keep == (0, n + 2)
        np.testing.assert_array_equal(plan.windows[0].ids, ids)
    for (_, previous_end), (start, _) in itertools.pairwise(windows):
        assert previous_end - start == min(overlap, CAPACITY // 2)


def test_flags_reach_the_engine():
    defaults = engine_settings(parse_settings([], environ={}))
    assert (defaults.late_chunking_overlap, defaults.max_document_tokens) == (256, 0)
    flags = engine_settings(
        parse_settings(["--late-chunking-overlap", "64", "--max-document-tokens", "5000"], {})
    )
    assert (flags.late_chunking_overlap, flags.max_document_tokens) == (64, 5000)
    environ = {"EMBEDDING_LATE_CHUNKING_OVERLAP": "0", "EMBEDDING_MAX_DOCUMENT_TOKENS": "777"}
    from_env = engine_settings(parse_settings([], environ=environ))
    assert (from_env.late_chunking_overlap, from_env.max_document_tokens) == (0, 777)


# --- vectors against the reference -------------------------------------------------------------


@pytest.mark.parametrize("windows", [1, 2, 3, 10])
@pytest.mark.parametrize(
    ("task", "dimensions"),
    [(SEPARATION, 0), (pb.TASK_RETRIEVAL_PASSAGE, 16), (pb.TASK_UNSPECIFIED, 8), (pb.TASK_TEXT_MATCHING, 32)],
)
def test_documents_of_several_windows_match_the_reference(stub, refs, windows, task, dimensions):
    ref = refs["small"]
    chunks = document(seed=100 * windows + task, content_tokens=tokens_for_windows(windows))
    response = embed(stub, model="small", inputs=chunks, task=task, dimensions=dimensions, late_chunking=True)
    expected, planned = ref.long_late_chunks(chunks, task, dimensions, SMALL_WINDOW, OVERLAP)
    if task == SEPARATION:  # no prefix: the words alone decide the windows
        assert planned == windows
    else:
        assert planned >= windows
    rows = dense_rows(response)
    assert [e.index for e in response.embeddings] == list(range(len(chunks)))
    assert all(row.shape == (dimensions or JINA_HIDDEN,) for row in rows)
    check_against_reference(f"small/{windows}-windows", rows, expected)
    # usage counts the document's tokens with its two special tokens, not the windows' repeats
    assert response.usage.prompt_tokens == ref.document_length(chunks, task)


def test_every_chunk_boundary_inside_and_across_overlaps(stub, refs):
    """One-word chunks: a boundary after every token, so inside every overlap and at every window edge."""
    ref = refs["small"]
    chunks = document(seed=7, content_tokens=tokens_for_windows(3) + 2, long_chunk=0)
    chunks = [w for chunk in chunks for w in chunk.split()]
    expected, planned = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, OVERLAP)
    assert planned == 3 and len(chunks) == tokens_for_windows(3) + 2
    rows = dense_rows(embed(stub, model="small", inputs=chunks, task=SEPARATION, late_chunking=True))
    check_against_reference("small/one-token-chunks", rows, expected)


@pytest.mark.parametrize("task", [SEPARATION, pb.TASK_RETRIEVAL_QUERY])
def test_a_chunk_longer_than_a_window(stub, refs, task):
    ref = refs["small"]
    chunks = document(seed=11, content_tokens=60, long_chunk=2 * CAPACITY + 3)
    assert max(len(chunk.split()) for chunk in chunks) > SMALL_WINDOW
    expected, planned = ref.long_late_chunks(chunks, task, 0, SMALL_WINDOW, OVERLAP)
    assert planned >= 6
    rows = dense_rows(embed(stub, model="small", inputs=chunks, task=task, late_chunking=True))
    check_against_reference("small/long-chunk", rows, expected)


def test_binary_output_of_a_long_document(stub, refs):
    ref = refs["small"]
    chunks = document(seed=5, content_tokens=tokens_for_windows(4))
    response = embed(
        stub,
        model="small",
        inputs=chunks,
        task=SEPARATION,
        dimensions=8,
        late_chunking=True,
        outputs=[pb.OUTPUT_TYPE_DENSE, pb.OUTPUT_TYPE_BINARY],
    )
    expected, _ = ref.long_late_chunks(chunks, SEPARATION, 8, SMALL_WINDOW, OVERLAP)
    assert len(response.embeddings) == 2 * len(chunks)
    for i, want in enumerate(expected):
        dense, binary = response.embeddings[2 * i : 2 * i + 2]
        assert dense.index == binary.index == i
        COSINES.check("small/binary", dense.dense.values, want)
        assert_binary_matches(binary.binary.bits, binary.binary.dimensions, want)


@pytest.mark.parametrize("task", [SEPARATION, pb.TASK_RETRIEVAL_PASSAGE])
@pytest.mark.parametrize("dimensions", [0, 16])
def test_a_short_document_is_the_one_window_rule(stub, refs, task, dimensions):
    """Within one window the result is today's: one sequence, the spans pooled over its states."""
    chunks = [
        "The cat sat on the mat.",
        "It was happy there in the evening sun.",
        "Dogs bark loudly at night",
    ]
    ref = refs["jina"]
    assert ref.document_length(chunks, task) <= JINA_MAX_TOKENS
    rows = dense_rows(
        embed(stub, model="jina", inputs=chunks, task=task, dimensions=dimensions, late_chunking=True)
    )
    check_against_reference("jina/one-window", rows, ref.late_chunks(chunks, task, dimensions))
    short = document(seed=3, content_tokens=tokens_for_windows(1))
    rows = dense_rows(embed(stub, model="small", inputs=short, task=SEPARATION, late_chunking=True))
    check_against_reference("small/one-window", rows, refs["small"].late_chunks(short, SEPARATION))


def test_late_chunking_really_happened(stub, refs):
    """Chunk vectors saw the other chunks' tokens, and later windows were not dropped.

    Chunks wholly inside window 0 equal the first window run alone (a window is
    an ordinary model input); the chunk that crosses into window 1 does not
    equal its part in a single truncated window; no chunk equals the chunk
    embedded on its own.
    """
    ref = refs["small"]
    rng = np.random.default_rng(19)
    chunks = [words(rng, 4) for _ in range(8)]  # spans end at rows 5, 9, 13, 17: the 4th crosses row 15
    content = sum(len(c.split()) for c in chunks)
    assert content > 2 * CAPACITY
    rows = dense_rows(embed(stub, model="small", inputs=chunks, task=SEPARATION, late_chunking=True))
    adapter = ref.adapter_index(SEPARATION)
    for chunk, row in zip(chunks, rows, strict=True):
        assert cosine(row, ref.dense(chunk, SEPARATION)) < 0.999

    encoded = ref.tokenizer.encode(" ".join(chunks))
    spans = late_chunk_spans(encoded, "", chunks)
    first_window = [*encoded.ids[: 1 + CAPACITY], encoded.ids[-1]]  # <s> + C[0:K] + </s>
    truncated = backbone_states(ref.model.weights, first_window, adapter)
    crossing = 0
    for (start, end), row in zip(spans, rows, strict=True):
        if end <= 1 + CAPACITY:  # wholly inside window 0
            COSINES.check("small/window-0", row, normalize(truncated[start:end].mean(0)))
        elif start < 1 + CAPACITY:  # crosses out of window 0
            crossing += 1
            assert cosine(row, normalize(truncated[start : 1 + CAPACITY].mean(0))) < 0.999
    assert crossing == 1


def test_stream_embed_runs_long_documents(stub, refs):
    ref = refs["small"]
    documents = {str(w): document(seed=50 + w, content_tokens=tokens_for_windows(w)) for w in (1, 2, 3, 10)}
    requests = [
        pb.EmbedRequest(request_id=key, model="small", inputs=chunks, task=SEPARATION, late_chunking=True)
        for key, chunks in documents.items()
    ]
    replies = {r.request_id: r for r in stub.StreamEmbed(iter(requests), timeout=60)}
    assert set(replies) == set(documents)
    for key, chunks in documents.items():
        assert not replies[key].HasField("error"), replies[key].error
        expected, planned = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, OVERLAP)
        assert planned == int(key)
        check_against_reference("small/stream", dense_rows(replies[key]), expected)


async def test_windows_are_sequences_that_batch_with_other_work(models, refs):
    """In-process, the session runs recorded: each window is its own row, <s> + C[s:e] + </s>,
    and queued behind a held run the windows share a run with an ordinary input of the same task."""
    loaded = load(ModelSpec("small", models["small"].path), sessions=1, threads=1)
    sessions = CountingSessions(loaded.sessions)
    wrapped = LoadedModel(model=loaded.model, sessions=sessions)  # type: ignore[arg-type]
    embedder = Embedder([wrapped], EngineSettings(late_chunking_overlap=OVERLAP))
    for batcher in embedder.batchers.values():
        batcher.start()
    ref = refs["small"]
    chunks = document(seed=29, content_tokens=tokens_for_windows(3))
    ids = ref.tokenizer.encode(" ".join(chunks)).ids
    content = ids[1:-1]
    step = CAPACITY - OVERLAP
    windows = [(k * step, min(k * step + CAPACITY, len(content))) for k in range(3)]
    expected_rows = {(ids[0], *content[s:e], ids[-1]) for s, e in windows}
    try:
        sessions.hold()
        blocker = asyncio.create_task(embedder.embed(EmbedJob(inputs=["cats"], task=SEPARATION)))
        await asyncio.to_thread(sessions.entered.acquire)
        long_job = asyncio.create_task(
            embedder.embed(EmbedJob(inputs=chunks, task=SEPARATION, late_chunking=True))
        )
        other = asyncio.create_task(embedder.embed(EmbedJob(inputs=["the dog"], task=SEPARATION)))
        for _ in range(6000):  # poll (up to 60 s) until 3 windows + 1 input wait
            if embedder.batcher("small").queue.total == 4:
                break
            await asyncio.sleep(0.01)
        assert embedder.batcher("small").queue.total == 4
        sessions.release()
        result, _, plain = await asyncio.gather(long_job, blocker, other)
    finally:
        sessions.release()
        await embedder.close()
    shared = [run for run in sessions.runs if expected_rows <= set(run.rows)]
    assert shared and tuple(ref.token_ids("the dog", SEPARATION)) in shared[0].rows
    assert result.prompt_tokens == len(ids)
    expected, _ = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, OVERLAP)
    check_against_reference("small/in-process", [v.dense[0] for v in result.vectors], expected)
    COSINES.check("small/in-process", plain.vectors[0].dense[0], ref.dense("the dog", SEPARATION))


# --- limits, ListModels, the default overlap, REST, the corpus CLI (server B) --------------------------


def test_list_models_reports_max_document_tokens(server_a, server_b):
    infos = {m.name: m for m in server_a.stub().ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert infos["small"].max_document_tokens == 16 * SMALL_WINDOW
    assert infos["jina"].max_document_tokens == 16 * JINA_MAX_TOKENS
    (info,) = server_b.stub().ListModels(pb.ListModelsRequest(), timeout=10).models
    assert info.max_document_tokens == DOCUMENT_LIMIT
    models = httpx.get(server_b.rest_url + "/v1/models", timeout=10).json()["data"]
    assert [m["max_document_tokens"] for m in models] == [DOCUMENT_LIMIT]


def test_a_document_over_the_limit_is_refused_naming_both_numbers(server_b, refs):
    stub = server_b.stub()
    at_limit = document(seed=9, content_tokens=DOCUMENT_LIMIT - 2)  # N + 2 = the limit: accepted
    assert refs["small"].document_length(at_limit, SEPARATION) == DOCUMENT_LIMIT
    reply = embed(stub, inputs=at_limit, task=SEPARATION, late_chunking=True)
    assert len(reply.embeddings) == len(at_limit) and reply.usage.prompt_tokens == DOCUMENT_LIMIT
    over = [*at_limit, "dog"]
    for truncate in (False, True):  # truncate does not apply to late chunking
        with pytest.raises(grpc.RpcError) as info:
            embed(stub, inputs=over, task=SEPARATION, late_chunking=True, truncate=truncate)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = info.value.details()
        assert details.startswith("inputs: ") and "101" in details and str(DOCUMENT_LIMIT) in details


def test_default_overlap_is_half_a_window(server_b, refs):
    ref = refs["small"]
    chunks = document(seed=13, content_tokens=tokens_for_windows(5, DEFAULT_OVERLAP))
    expected, planned = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, DEFAULT_OVERLAP)
    assert planned == 5
    rows = dense_rows(embed(server_b.stub(), inputs=chunks, task=SEPARATION, late_chunking=True))
    check_against_reference("small/default-overlap", rows, expected)
    # a different overlap gives different vectors: the flag is what decides the windows
    other, _ = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, OVERLAP)
    assert min(cosine(row, want) for row, want in zip(rows, other, strict=True)) < 0.999


def test_rest_late_chunking_of_a_long_document(server_b, refs):
    ref = refs["small"]
    chunks = document(seed=17, content_tokens=tokens_for_windows(3, DEFAULT_OVERLAP))
    body = {"input": chunks, "late_chunking": True, "task": "separation", "dimensions": 16}
    reply = httpx.post(server_b.rest_url + "/v1/embeddings", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    rows = [np.array(item["embedding"], np.float64) for item in data["data"]]
    expected, planned = ref.long_late_chunks(chunks, SEPARATION, 16, SMALL_WINDOW, DEFAULT_OVERLAP)
    assert planned == 3
    check_against_reference("small/rest", rows, expected)
    assert data["usage"]["prompt_tokens"] == ref.document_length(chunks, SEPARATION)
    too_long = {"input": document(seed=1, content_tokens=DOCUMENT_LIMIT), "late_chunking": True}
    refused = httpx.post(server_b.rest_url + "/v1/embeddings", json=too_long, timeout=30)
    assert refused.status_code == 400
    assert str(DOCUMENT_LIMIT) in refused.json()["error"]["message"]


def test_corpus_cli_late_chunking(server_b, refs, tmp_path: Path):
    ref = refs["small"]
    documents = [
        document(seed=30 + w, content_tokens=tokens_for_windows(w, DEFAULT_OVERLAP)) for w in (1, 4, 2)
    ]
    source = tmp_path / "documents.jsonl"
    source.write_text(
        "".join(json.dumps({"id": f"d{i}", "chunks": c}) + "\n" for i, c in enumerate(documents))
    )
    flags = ["--target", server_b.target, "--task", "separation", "--late-chunking", "--no-progress"]
    output = tmp_path / "chunks.jsonl"
    done = run_cli("corpus", str(source), str(output), *flags)
    assert done.returncode == 0, done.stderr
    assert "3 records" in done.stderr
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["d0", "d1", "d2"]
    for line, chunks in zip(lines, documents, strict=True):
        expected, _ = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, DEFAULT_OVERLAP)
        check_against_reference("small/corpus", [np.array(v) for v in line["embeddings"]], expected)

    # resume: a run stopped after the first document goes on from the second, to identical bytes
    resumed = tmp_path / "resumed.jsonl"
    first_line = output.read_bytes().split(b"\n")[0] + b"\n"
    Path(f"{resumed}.partial").write_bytes(first_line + b'{"id": "d1", "embe')  # torn second line
    job = CorpusJob(source, resumed, task=SEPARATION, late_chunking=True)
    Path(f"{resumed}.partial.json").write_text(json.dumps(job.settings(3), sort_keys=True))
    again = run_cli("corpus", str(source), str(resumed), *flags)
    assert again.returncode == 0, again.stderr
    assert "resuming: 1 of 3" in again.stderr
    # Same rows, the first kept byte for byte; re-embedded vectors equal to float32 rounding only:
    # a document's windows may share a run with another's, and which do depends on timing.
    assert resumed.read_bytes().startswith(first_line)
    again_lines = [json.loads(line) for line in resumed.read_text().splitlines()]
    assert [line["id"] for line in again_lines] == ["d0", "d1", "d2"]
    for got, want in zip(again_lines, lines, strict=True):
        np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-6)

    # .npy: a float32 row per chunk, in input order
    npy = tmp_path / "chunks.npy"
    done = run_cli("corpus", str(source), str(npy), *flags)
    assert done.returncode == 0, done.stderr
    rows = np.load(npy)
    everything = np.array([v for line in lines for v in line["embeddings"]], np.float32)
    assert rows.shape == everything.shape
    np.testing.assert_allclose(rows, everything, atol=1e-6)  # another run: rounding only (above)
    # killed in the middle of the second document: resumed from the last whole document, same bytes
    whole = npy.read_bytes()
    header = len(whole) - rows.nbytes
    torn = header + 4 * rows.shape[1] * (len(documents[0]) + len(documents[1]) // 2) + 7
    resumed_npy = tmp_path / "resumed.npy"
    Path(f"{resumed_npy}.partial").write_bytes(whole[:torn])
    Path(f"{resumed_npy}.partial.json").write_text(json.dumps(job.settings(3), sort_keys=True))
    again = run_cli("corpus", str(source), str(resumed_npy), *flags)
    assert again.returncode == 0, again.stderr
    assert "resuming: 1 of 3" in again.stderr
    kept = header + 4 * rows.shape[1] * len(documents[0])  # the header and the first whole document
    assert resumed_npy.read_bytes()[:kept] == whole[:kept]
    np.testing.assert_allclose(np.load(resumed_npy), rows, atol=1e-6)
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"id": 1, "text": "no chunks here"}) + "\n")
    bad = run_cli("corpus", str(plain), str(tmp_path / "bad.jsonl"), *flags)
    assert bad.returncode == 1 and '"chunks"' in bad.stderr


def test_cli_embed_late_chunking_and_models(server_b, refs):
    ref = refs["small"]
    chunks = document(seed=23, content_tokens=tokens_for_windows(2, DEFAULT_OVERLAP))
    flags = ["--target", server_b.target, "--task", "separation"]
    done = run_cli("embed", *chunks, "--late-chunking", "--json", *flags)
    assert done.returncode == 0, done.stderr
    rows = [np.array(json.loads(line)["embedding"]) for line in done.stdout.splitlines()]
    expected, planned = ref.long_late_chunks(chunks, SEPARATION, 0, SMALL_WINDOW, DEFAULT_OVERLAP)
    assert planned == 2
    check_against_reference("small/cli-embed", rows, expected)
    models = run_cli("models", "--json", "--target", server_b.target)
    assert models.returncode == 0, models.stderr
    assert [m["max_document_tokens"] for m in json.loads(models.stdout)] == [DOCUMENT_LIMIT]
    table = run_cli("models", "--target", server_b.target)
    assert "MAX DOCUMENT" in table.stdout and str(DOCUMENT_LIMIT) in table.stdout


# --- the built-in model (BERT: [CLS] ... [SEP] windows), against the numpy MiniLM --------------------


def test_builtin_model_late_chunks_a_three_window_document(default_server):
    """The real model, default flags: 256-token windows overlapping by 127 tokens.

    The server runs an int8 export and the reference is fp32 numpy, so the
    check is cosine >= 0.99 and, per chunk, nearer the windowed reference than
    the chunk embedded alone.
    """
    rng = np.random.default_rng(4)
    vocabulary = "the river city old house garden road train book night morning rain music people".split()
    tokenizer = ReferenceTokenizer(minilm_reference.model_dir())
    chunks: list[str] = []
    while len(tokenizer.encode(" ".join(chunks)).ids) < 420:  # one word, one token: 420-460 tokens
        chunks.append(" ".join(rng.choice(vocabulary, size=int(rng.integers(8, 40)))) + ".")
    encoded = tokenizer.encode(" ".join(chunks))
    assert 2 * 127 + 254 >= len(encoded.ids) - 2 > 127 + 254  # exactly 3 windows

    def run(ids: list[int]) -> np.ndarray:
        return minilm_reference.hidden_states(np.array([ids]), np.ones((1, len(ids)), np.int64))[0]

    states = windowed_states(run, encoded.ids, 256, DEFAULT_OVERLAP)
    assert len(states.windows) == 3
    expected = [normalize(states.rows[a:b].mean(0)) for a, b in late_chunk_spans(encoded, "", chunks)]
    reply = embed(default_server.stub(), inputs=chunks, late_chunking=True)
    assert reply.usage.prompt_tokens == len(encoded.ids)
    rows = dense_rows(reply)
    alone = minilm_reference.embed(chunks)
    for row, want, single in zip(rows, expected, alone, strict=True):
        assert cosine(row, want) >= 0.99
        assert cosine(row, want) > cosine(row, single)
