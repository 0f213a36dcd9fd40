"""``embedding-client corpus`` with Parquet in and out: the same guarantees as JSON Lines and .npy.

Outputs are checked against the server's unary answers; the resume test kills
the CLI mid-run, tears the last message of its partial file, and compares the
resumed Parquet file's bytes with an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedding_client.corpus_formats import count_records, read_records
from embedding_client.corpus_input import CorpusInputError
from embedding_client.corpus_parquet import ROW_GROUP_ROWS

from tests.support.corpus_cli import N, kill_mid_run, run_cli, unary_vectors
from tests.support.server import RunningServer
from tests.support.texts import sentence


@pytest.fixture(scope="module")
def expected(default_server: RunningServer, corpus) -> np.ndarray:
    """The unary answers for this module's corpus (as test_corpus_cli's, for these texts)."""
    return unary_vectors(default_server, corpus[1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """docs.parquet: int64 ids, texts, an extra column, row groups of 100 (resume skips whole groups)."""
    texts = [sentence(i) for i in range(N)]
    path = tmp_path_factory.mktemp("parquet") / "docs.parquet"
    table = pa.table({"lang": ["en"] * N, "id": [1000 + i for i in range(N)], "text": texts})
    pq.write_table(table, path, row_group_size=100)
    return path, texts


def vectors_of(path: Path) -> np.ndarray:
    column = pq.read_table(path).column("embedding").combine_chunks()
    return column.flatten().to_numpy().reshape(len(column), -1)


def test_parquet_to_parquet_npy_and_jsonl(default_server, corpus, expected, tmp_path):
    source, _ = corpus
    outputs = [tmp_path / "vectors.parquet", tmp_path / "vectors.npy", tmp_path / "vectors.jsonl"]
    for output in outputs:
        done = run_cli("corpus", str(source), str(output), "--target", default_server.target, "--no-progress")
        assert done.returncode == 0, done.stderr
        assert f"{N} records" in done.stderr
        assert not Path(f"{output}.partial").exists() and not Path(f"{output}.partial.json").exists()
    table = pq.read_table(outputs[0])
    assert table.schema == pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), 384))])
    assert table.column("id").to_pylist() == [1000 + i for i in range(N)]
    np.testing.assert_allclose(vectors_of(outputs[0]), expected, atol=1e-6)
    np.testing.assert_array_equal(np.load(outputs[1]), vectors_of(outputs[0]))
    lines = [json.loads(line) for line in outputs[2].read_text().splitlines()]
    assert [line["id"] for line in lines] == [1000 + i for i in range(N)]


def test_jsonl_to_parquet_and_back(default_server, tmp_path):
    """JSON Lines in, Parquet out (string ids), and that output read as a corpus of its own ids."""
    source = tmp_path / "small.jsonl"
    source.write_text("".join(json.dumps({"id": f"d{i}", "text": sentence(i)}) + "\n" for i in range(30)))
    output = tmp_path / "small.parquet"
    assert run_cli("corpus", str(source), str(output), "--target", default_server.target).returncode == 0
    assert pq.read_table(output).column("id").to_pylist() == [f"d{i}" for i in range(30)]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"id": 1, "text": "a"}\n{"id": "two", "text": "b"}\n')
    refused = run_cli(
        "corpus", str(mixed), str(tmp_path / "mixed.parquet"), "--target", default_server.target
    )
    assert refused.returncode == 1 and "use .jsonl for ids of mixed types" in refused.stderr


def test_an_interrupted_parquet_run_resumes_to_an_identical_file(default_server, corpus, tmp_path):
    source, _ = corpus
    flags = ["--target", default_server.target, "--batch-size", "8", "--window", "2", "--no-progress"]
    flags += ["--length-sort", "40"]
    whole = tmp_path / "whole.parquet"
    assert run_cli("corpus", str(source), str(whole), *flags).returncode == 0
    reference = whole.read_bytes()

    resumed = tmp_path / "resumed.parquet"
    partial = Path(f"{resumed}.partial")
    kill_mid_run(["corpus", str(source), str(resumed), *flags], partial, N // 3 * 384 * 4)
    assert not resumed.exists()
    done_rows = sum(batch.num_rows for batch in pa.ipc.open_stream(partial.read_bytes()))
    assert 0 < done_rows < N
    schema = pa.ipc.open_stream(partial.read_bytes()).schema
    torn = pa.record_batch(
        [pa.array([1]), pa.FixedSizeListArray.from_arrays(pa.array(np.ones(384, np.float32)), 384)],
        schema=schema,
    )
    with open(partial, "ab") as tail:  # as if killed in the middle of a write
        tail.write(torn.serialize().to_pybytes()[:700])

    changed = run_cli("corpus", str(source), str(resumed), *flags, "--dimensions", "32")
    assert changed.returncode == 1 and "other settings" in changed.stderr

    finish = run_cli("corpus", str(source), str(resumed), *flags)
    assert finish.returncode == 0, finish.stderr
    assert f"resuming: {done_rows} of {N} records" in finish.stderr  # the torn message is not a row
    assert f"{N - done_rows} embedded" in finish.stderr
    assert resumed.read_bytes() == reference


def test_row_groups_do_not_depend_on_the_writes(tmp_path):
    """Writes of any size come out as the same row groups of ROW_GROUP_ROWS rows."""
    from embedding_client.corpus_parquet import ParquetOutput

    rows = ROW_GROUP_ROWS + 5
    vectors = np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)
    files = []
    for step in (rows, 1000, 7):
        output = ParquetOutput(tmp_path / f"step{step}.parquet", rows)
        output.resume({"case": 1})
        for start in range(0, rows, step):
            output.write(list(range(start, min(rows, start + step))), vectors[start : start + step])
        output.finish()
        files.append(output.path.read_bytes())
    assert files[0] == files[1] == files[2]
    metadata = pq.ParquetFile(tmp_path / f"step{rows}.parquet").metadata
    assert [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)] == [ROW_GROUP_ROWS, 5]
    np.testing.assert_array_equal(vectors_of(tmp_path / "step7.parquet"), vectors)


def test_reading_parquet_records(tmp_path):
    source = tmp_path / "r.parquet"
    pq.write_table(pa.table({"text": ["x", "y", None, "z"]}), source, row_group_size=1)
    assert count_records(source) == 4
    records = read_records(source, skip=1)
    first = next(records)
    assert (first.text, first.id) == ("y", None)
    with pytest.raises(CorpusInputError, match=r"r\.parquet: row 2: \"text\" is null"):
        next(records)
    assert [r.text for r in read_records(source, skip=3)] == ["z"]
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"body": ["x"]}), wrong)
    with pytest.raises(CorpusInputError, match=r'no "text" column \(columns: body\)'):
        next(read_records(wrong))
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    with pytest.raises(CorpusInputError, match='"text" must be a string column, got int64'):
        next(read_records(numbers))


def test_late_chunking_parquet_documents(default_server, tmp_path):
    """A chunks column in, an embeddings column (a vector per chunk) out, as the unary late-chunked Embed."""
    from embedding_client.proto import embedding_pb2 as pb

    from tests.support.replies import raw_dense

    documents = [["The city lies on a river.", "It has three bridges."], ["One chunk only."], ["a", "b", "c"]]
    source = tmp_path / "documents.parquet"
    pq.write_table(pa.table({"id": ["x", "y", "z"], "chunks": documents}), source)
    output = tmp_path / "chunks.parquet"
    done = run_cli("corpus", str(source), str(output), "--late-chunking", "--target", default_server.target)
    assert done.returncode == 0, done.stderr
    table = pq.read_table(output)
    assert table.schema == pa.schema(
        [("id", pa.string()), ("embeddings", pa.list_(pa.list_(pa.float32(), 384)))]
    )
    assert table.column("id").to_pylist() == ["x", "y", "z"]
    stub = default_server.stub()
    for got, chunks in zip(table.column("embeddings").to_pylist(), documents, strict=True):
        want = raw_dense(stub.Embed(pb.EmbedRequest(inputs=chunks, late_chunking=True), timeout=60))
        np.testing.assert_allclose(np.array(got, dtype=np.float32), want, atol=1e-6)
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"chunks": [["fine"], ["ok", " "]]}), blank)
    refused = run_cli(
        "corpus", str(blank), str(tmp_path / "b.jsonl"), "--late-chunking", "--target", default_server.target
    )
    assert refused.returncode == 1 and 'row 1: "chunks"[1] must be a non-blank string' in refused.stderr
