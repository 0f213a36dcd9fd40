"""The StreamEmbed bookkeeping on its own: order, windows, resends without duplicates or gaps.

Pure logic (no server): the properties every driver relies on, checked with a
scripted sequence of sends, replies and broken attempts, and with random ones
(hypothesis) against a plain model of what must come out.
"""

from __future__ import annotations

import pytest
from embedding_client.ledger import Ledger, Step
from hypothesis import given, settings
from hypothesis import strategies as st


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pull(ledger: Ledger, attempt: int, source: list[list[str]]) -> object:
    """Carry out one step for ``attempt``; returns the batch sent, or the step."""
    action = ledger.next_action(attempt)
    if action.step is Step.SEND:
        return action.batch
    if action.step is Step.PULL:
        return ledger.register(attempt, source.pop(0) if source else None)
    return action.step


def test_sequence_numbers_follow_the_input_and_results_come_out_in_order():
    ledger = Ledger(window=4, max_ahead=8)
    source = [["a"], ["b", "c"], ["d"]]
    attempt = ledger.open_attempt()
    sent = [pull(ledger, attempt, source) for _ in range(3)]
    assert [b.seq for b in sent] == [0, 1, 2]
    assert [b.offset for b in sent] == [0, 1, 3]
    ledger.complete(attempt, sent[2], "r2")
    ledger.complete(attempt, sent[1], "r1")
    assert ledger.pop_ready() == []  # batch 0 is still out: nothing may overtake it
    ledger.complete(attempt, sent[0], "r0")
    assert ledger.pop_ready() == ["r0", "r1", "r2"]
    assert pull(ledger, attempt, source) is None  # the input is exhausted
    assert ledger.next_action(attempt).step is Step.END
    assert ledger.finished


def test_window_limits_one_attempt_and_max_ahead_limits_the_input():
    ledger = Ledger(window=2, max_ahead=3)
    source = [[str(i)] for i in range(10)]
    first, second = ledger.open_attempt(), ledger.open_attempt()
    a0, a1 = pull(ledger, first, source), pull(ledger, first, source)
    assert ledger.next_action(first).step is Step.WAIT  # window of 2 is full
    b0 = pull(ledger, second, source)
    assert ledger.next_action(second).step is Step.WAIT  # 3 batches ahead of the next result
    ledger.complete(first, a1, "x")
    assert ledger.next_action(second).step is Step.WAIT  # a1 is done but a0 still holds the line
    ledger.complete(first, a0, "x")
    assert len(ledger.pop_ready()) == 2
    assert pull(ledger, second, source).seq == 3
    assert b0.seq == 2
    assert len(source) == 6  # never pulled further than allowed


def test_a_broken_attempt_resends_only_its_unanswered_batches_lowest_first():
    ledger = Ledger(window=8, max_ahead=16)
    source = [[str(i)] for i in range(6)]
    first = ledger.open_attempt()
    sent = [pull(ledger, first, source) for _ in range(4)]
    ledger.complete(first, sent[1], "r1")
    assert ledger.end_attempt(first) == 3  # 0, 2 and 3 were unanswered
    second = ledger.open_attempt()
    resent = [pull(ledger, second, source) for _ in range(3)]
    assert [b.seq for b in resent] == [0, 2, 3]
    assert ledger.stats.requests_resent == 3
    assert pull(ledger, second, source).seq == 4  # then new input
    # A late reply through the dead attempt is not accepted: no duplicates.
    assert not ledger.complete(first, resent[0], "stale")
    assert ledger.lookup(first, "0") is None
    assert ledger.lookup(second, "0") is resent[0]


def test_retry_later_waits_for_its_backoff():
    clock = FakeClock()
    ledger = Ledger(window=4, max_ahead=4, clock=clock)
    attempt = ledger.open_attempt()
    source = [["a"]]
    batch = pull(ledger, attempt, source)
    assert pull(ledger, attempt, source) is None  # the input is exhausted
    ledger.retry_later(attempt, batch, delay=2.0)
    action = ledger.next_action(attempt)
    assert action.step is Step.WAIT and action.delay == pytest.approx(2.0)
    clock.now = 2.5
    assert ledger.next_action(attempt).batch is batch


def test_rotation_ends_an_old_attempt_for_sending():
    clock = FakeClock()
    ledger = Ledger(window=4, max_ahead=8, rotate_after=5.0, clock=clock)
    attempt = ledger.open_attempt()
    pull(ledger, attempt, [["a"], ["b"]])
    clock.now = 6.0
    assert ledger.next_action(attempt).step is Step.END
    assert attempt in ledger.rotated and attempt not in ledger.sending
    assert ledger.stats.rotations == 1


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 3), min_size=0, max_size=25),
    window=st.integers(1, 4),
    max_ahead=st.integers(1, 6),
    script=st.lists(st.tuples(st.sampled_from(["send", "reply", "break"]), st.integers(0, 50)), max_size=300),
)
def test_random_schedules_emit_every_input_exactly_once_in_order(sizes, window, max_ahead, script):
    """Whatever the order of sends, replies and broken attempts: each batch once, in order, bounded."""
    batches = [[f"{i}.{j}" for j in range(n)] for i, n in enumerate(sizes)]
    source = list(batches)
    ledger = Ledger(window=window, max_ahead=max_ahead)
    attempts = [ledger.open_attempt(), ledger.open_attempt()]
    emitted: list[list[str]] = []

    def step(kind: str, pick: int) -> None:
        attempt = attempts[pick % len(attempts)]
        if kind == "send":
            pull(ledger, attempt, source)
        elif kind == "reply":
            mine = [b for b in ledger.pending.values() if b.attempt == attempt]
            if mine:
                batch = mine[pick % len(mine)]
                ledger.complete(attempt, batch, batch.texts)
        else:
            ledger.end_attempt(attempt)
            attempts[attempts.index(attempt)] = ledger.open_attempt()
        emitted.extend(ledger.pop_ready())
        assert ledger.registered - ledger.next_emit <= max_ahead
        assert all(count <= window for count in ledger.outstanding.values())

    for kind, pick in script:
        step(kind, pick)
    for _ in range(10 * len(batches) + 10):  # then let it finish: send and answer everything
        if ledger.finished:
            break
        for pick in (0, 1):
            step("send", pick)
            step("reply", pick)
    assert ledger.finished
    assert emitted == batches


def test_each_stall_without_a_reply_doubles_the_stall_limit_and_a_reply_resets_it():
    """A slow but alive server must not be cancelled forever (one busy core: every call is slow)."""
    from embedding_client.requests import EmbedOptions
    from embedding_client.retry import StreamRetry
    from embedding_client.stream_core import StreamCore

    core = StreamCore(
        EmbedOptions(), window=4, streams=1, max_ahead=None, retry=StreamRetry(stall_timeout=1.0)
    )
    clock = FakeClock()
    core.ledger.clock = clock
    source = [["a"], ["b"]]

    def open_and_send() -> tuple[int, object]:
        attempt = core.ledger.open_attempt()
        core.calls[attempt] = f"call-{attempt}"
        return attempt, pull(core.ledger, attempt, source)

    first, _ = open_and_send()
    clock.now = 1.5
    assert core.stalled_calls() == ["call-0"]  # past 1 s: stalled
    core.ledger.end_attempt(first)
    core.calls.pop(first)

    second, batch = open_and_send()  # the resend
    clock.now = 1.5 + 1.5
    assert core.stalled_calls() == []  # 1.5 s is past the first limit but within the doubled one
    clock.now = 1.5 + 2.5
    assert core.stalled_calls() == ["call-1"]
    assert core.ledger.stalls_in_a_row == 2 and core.stats.stalled_attempts == 2

    assert core.ledger.complete(second, batch, "result")  # a reply: the next stall is judged at 1 s again
    assert core.ledger.stalls_in_a_row == 0


@pytest.mark.parametrize(
    ("reason", "resent"),
    [("QUEUE_FULL", True), ("MEMORY_LIMIT", False), ("", False)],
)
def test_only_a_full_queue_is_a_not_now_reply(reason: str, resent: bool):
    """MEMORY_LIMIT (a sequence the budget can never run) once looped on resends for 120 s."""
    import grpc
    from embedding_client.errors import ErrorDetails, error_for
    from embedding_client.requests import EmbedOptions
    from embedding_client.retry import StreamRetry
    from embedding_client.stream_core import StreamCore

    core = StreamCore(EmbedOptions(), window=4, streams=1, max_ahead=None, retry=StreamRetry())
    attempt = core.ledger.open_attempt()
    batch = pull(core.ledger, attempt, [["a long text"]])
    refusal = error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "no", details=ErrorDetails(reason=reason or None))
    core.settle(attempt, batch, refusal)
    if resent:
        assert batch.seq not in core.ledger.done and batch.attempt is None  # waits out a backoff
    else:
        [result] = core.take_ready() or []
        assert result.error is refusal  # handed out at its position (raised unless on_error="yield")
