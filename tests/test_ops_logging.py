"""Log formats: JSON lines for pipelines, text for people; both carry the current call's request id."""

from __future__ import annotations

import io
import json
import logging

import pytest
from embedding_server.call_context import call_scope, clean_request_id, record_engine_time
from embedding_server.logging_setup import configure


@pytest.fixture
def capture():
    """The root logger configured into a buffer; the previous handlers put back after."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    buffer = io.StringIO()

    def setup(json_lines: bool) -> io.StringIO:
        configure("debug", json_lines=json_lines, stream=buffer)
        return buffer

    yield setup
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


def test_json_lines_with_request_id_extras_and_exception(capture):
    buffer = capture(json_lines=True)
    log = logging.getLogger("embedding_server.test")
    with call_scope("req-123"):
        log.info("hello %s", "world", extra={"model": "m1", "color_message": "\x1b[36mhello"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert first["message"] == "hello world"
    assert first["request_id"] == "req-123"
    assert first["model"] == "m1"
    assert first["level"] == "info" and first["logger"] == "embedding_server.test"
    assert "color_message" not in first
    assert "request_id" not in second  # outside a call
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exception"]


def test_text_lines_append_the_request_id(capture):
    buffer = capture(json_lines=False)
    log = logging.getLogger("embedding_server.test")
    with call_scope("abc"):
        log.warning("inside")
    log.warning("outside")
    inside, outside = buffer.getvalue().splitlines()
    assert inside.endswith("WARNING embedding_server.test: inside [request_id=abc]")
    assert outside.endswith("WARNING embedding_server.test: outside")


def test_engine_time_accumulates_per_call_and_is_dropped_outside():
    record_engine_time(1.0, 1.0)  # no call: nothing to record into, no error
    with call_scope("x") as call:
        record_engine_time(0.25, 0.5)
        record_engine_time(0.25, 0.5)
    assert (call.queue_seconds, call.inference_seconds) == (0.5, 1.0)


@pytest.mark.parametrize("offered", [None, "", "x" * 200, "line\nbreak", "naïve"])
def test_unusable_request_ids_are_replaced(offered):
    fresh = clean_request_id(offered)
    assert fresh != offered and len(fresh) == 32


def test_a_clean_request_id_is_kept():
    assert clean_request_id("trace-42/abc") == "trace-42/abc"


def test_the_text_time_stamp_is_the_standard_one_from_second_to_second():
    """The text format makes its date and time once a second: each record still gets its own stamp."""
    from embedding_server.logging_setup import TextFormatter

    ours, standard = TextFormatter(), logging.Formatter()
    start = 1_700_000_000.25
    for created in (start, start + 0.5, start + 0.99, start + 1.0, start + 61.7, start + 0.1):
        record = logging.makeLogRecord({"msg": "x", "created": created, "msecs": created % 1 * 1000})
        assert ours.formatTime(record) == standard.formatTime(record)
