"""The unit of work that flows through the batcher: one sequence of token ids."""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from ..models.base import RowRequest
from ..models.types import Priority, SequenceVectors

_arrival = itertools.count()


class Reply:
    """One request's vectors, gathered from its items' runs in input order, behind one future.

    One future per request rather than one per item and a gather over them: the inputs' futures,
    their done callbacks and the gather's bookkeeping were a tenth of the engine path's time in a
    profile of 16 x 8 in-process calls. Every item of a request shares its ``Reply``: the first failure
    (a failed run, a deadline) fails the request, a cancelled caller cancels it.
    """

    __slots__ = ("_missing", "_vectors", "future")

    def __init__(self, future: asyncio.Future[list[SequenceVectors]], count: int) -> None:
        self.future = future
        self._vectors: list[SequenceVectors | None] = [None] * count
        self._missing = count

    def done(self) -> bool:
        """Answered, failed or cancelled: its waiting items need not run."""
        return self.future.done()

    def deliver(self, index: int, vectors: SequenceVectors) -> None:
        """Item ``index``'s vectors; the last one answers the request."""
        if self.future.done():
            return
        self._vectors[index] = vectors
        self._missing -= 1
        if self._missing == 0:
            self.future.set_result(self._vectors)  # type: ignore[arg-type]  # every slot is filled

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)

    def cancel(self) -> None:
        self.future.cancel()


@dataclass(eq=False, slots=True)
class WorkItem:
    """One sequence (an input, or a late-chunked document) waiting for a session run."""

    ids: np.ndarray  # int64 [n]
    row: RowRequest
    batch_key: int  # items with equal keys may share a run (jina-v3: the task)
    task: int
    deadline: float | None  # time.monotonic() after which the model must not run it
    reply: Reply  # its request's, shared by all the request's items
    priority: Priority = Priority.INTERACTIVE  # never UNSPECIFIED here: the API layer resolves it
    flow: object = None  # batch work: the fair-queueing key (one client connection)
    index: int = 0  # its place among its request's sequences
    arrival: int = field(default_factory=lambda: next(_arrival))
    enqueued: float = field(default_factory=time.monotonic)  # for queue/inference timings
    started: float | None = None  # its batch's session run began
    ran: float | None = None  # its batch's session run returned
    finished: float | None = None  # its vectors are ready
    length: int = field(init=False)  # tokens; read many times a batch choice, so kept, not a property

    def __post_init__(self) -> None:
        self.length = int(self.ids.shape[0])


@dataclass(frozen=True)
class PaddedBatch:
    """A batch as the session sees it: right-padded ids and the attention mask."""

    input_ids: np.ndarray  # int64 [B,T]
    attention_mask: np.ndarray  # int64 [B,T]

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def pad(items: list[WorkItem], pad_id: int) -> PaddedBatch:
    """Right-pad to the longest item with the model's pad id (XLM-R: 1, not 0)."""
    longest = max(item.length for item in items)
    input_ids = np.full((len(items), longest), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(items), longest), dtype=np.int64)
    for row, item in enumerate(items):
        input_ids[row, : item.length] = item.ids
        attention_mask[row, : item.length] = 1
    return PaddedBatch(input_ids, attention_mask)
