"""Requests of similar-length texts from a sliding look-ahead, and the results back in input order.

A server batches the texts it has in flight by length; the padding it cannot
avoid is what requests of mixed lengths force on it. Reading up to
``lookahead`` texts ahead and cutting requests of texts alike in length makes
each request (and the requests in flight together) pad little (see
bench/corpus_throughput.py).

Each request is anchored on the oldest text not yet sent and filled with the
oldest pooled texts within 5% of its length, or, if there are too few, with
those closest to it in length (the server's own batch selection,
engine/batch_selection.py, anchors on the oldest too). So every request finishes
the oldest outstanding input, and the in-order prefix of finished inputs
grows with every reply instead of once per sorted block: a consumer that
writes what is done (the corpus command) keeps all but the last few replies
when it is interrupted, and its progress follows the replies.

Bounds: the reader never runs more than ``lookahead`` positions past the
oldest unsent text, so the pool holds fewer than ``lookahead`` texts; results
come back in request order (the stream keeps it) and each reply completes its
anchor, so when request *j*'s reply is in, every input up to its anchor is
done and the rows :class:`Reorder` holds back lie after it, within the
look-ahead: fewer than ``lookahead`` rows are ever held (kept as just those
rows, handed-out rows are dropped).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Sequence
from operator import itemgetter
from typing import Any

import numpy as np

from .errors import EmbeddingError
from .requests import DEFAULT_MAX_BATCH_CHARS
from .results import Embeddings, concatenate

#: The input positions of one request's texts, in the request's order (a plan per request sent).
Plan = np.ndarray
#: Texts within this fraction of the anchor's length (in characters) pad alike; of those the oldest
#: go first, so fewer finished rows wait for an earlier one. On mixed 5-60 word texts with a
#: look-ahead of 4096: rows held back median 1189 (max 1654) instead of 2033 (3905) when always
#: taking the closest in length, for 0.885 instead of 0.889 real/padded tokens per request.
LENGTH_TOLERANCE = 0.05


class LengthPool:
    """Texts read ahead and not yet sent, kept sorted by length; cuts each request around the oldest."""

    def __init__(self, batch_size: int, lookahead: int, max_chars: int = DEFAULT_MAX_BATCH_CHARS) -> None:
        if batch_size < 1 or lookahead < 1:
            raise ValueError(f"batch_size and length_sort: must be >= 1, got {batch_size}, {lookahead}")
        self.batch_size = batch_size
        self.lookahead = lookahead
        self.max_chars = max_chars
        self.keys: list[tuple[int, int]] = []  # (length, position), ascending
        self.texts: dict[int, str] = {}  # position -> text, unsent only
        self.read = 0  # texts read so far (the next one's position)
        self.oldest = 0  # the lowest unsent position (== read when the pool is empty)
        self.ended = False
        self.failure: Exception | None = None

    def wants(self) -> bool:
        """Whether to read another text: the input goes on and the reader stays within the look-ahead."""
        return not self.ended and self.read < self.oldest + self.lookahead

    def end(self, failure: Exception | None = None) -> None:
        """The input is over (or failed: the failure is raised once the texts before it went out)."""
        self.ended, self.failure = True, failure

    def next_request(self, plans: deque[Plan]) -> list[str] | None:
        """The next request, its plan queued first; None when all is sent."""
        if self.keys:
            plan, request = self.take()
            plans.append(plan)
            return request
        if self.failure is not None:
            raise self.failure
        return None

    def add(self, text: object) -> None:
        if not isinstance(text, str):
            raise TypeError(f"inputs[{self.read}]: expected str, got {type(text).__name__}")
        insort(self.keys, (len(text), self.read))
        self.texts[self.read] = text
        self.read += 1

    def take(self) -> tuple[Plan, list[str]]:
        """The next request: the oldest text, then the oldest of those about as long, else the closest."""
        target = len(self.texts[self.oldest])
        low = bisect_left(self.keys, (int(target * (1 - LENGTH_TOLERANCE)), -1))
        high = bisect_right(self.keys, (int(target * (1 + LENGTH_TOLERANCE)), self.read))
        if high - low >= self.batch_size:
            chosen = heapq.nsmallest(self.batch_size, self.keys[low:high], key=itemgetter(1))  # anchor first
            chars = 0
            for count, (length, _) in enumerate(chosen):
                chars += length
                if count and chars > self.max_chars:
                    del chosen[count:]
                    break
            for key in chosen:
                del self.keys[bisect_left(self.keys, key)]
        else:
            chosen = self._closest(target)
        positions = [position for _, position in chosen]
        texts = [self.texts.pop(position) for position in positions]
        while self.oldest < self.read and self.oldest not in self.texts:
            self.oldest += 1
        return np.array(positions, dtype=np.int64), texts

    def _closest(self, target: int) -> list[tuple[int, int]]:
        """The oldest text and its closest neighbours in length, taken out of the pool."""
        keys = self.keys
        low = high = bisect_left(keys, (target, self.oldest))
        chars = target
        while high - low + 1 < self.batch_size:
            left = low - 1 if low > 0 and chars + keys[low - 1][0] <= self.max_chars else None
            right = high + 1 if high + 1 < len(keys) and chars + keys[high + 1][0] <= self.max_chars else None
            if left is None and right is None:
                break
            if right is None or (left is not None and target - keys[left][0] <= keys[right][0] - target):
                assert left is not None  # not both None: the loop stopped above
                low = left
                chars += keys[low][0]
            else:
                high = right
                chars += keys[high][0]
        chosen = keys[low : high + 1]
        del keys[low : high + 1]
        return chosen


def sorted_requests(
    texts: Iterable[str], batch_size: int, lookahead: int, plans: deque[Plan]
) -> Iterator[list[str]]:
    """Requests of similar-length texts; each request's plan is queued before the request goes out.

    If the input raises, the texts read before the failure still go out first.
    """
    pool = LengthPool(batch_size, lookahead)
    iterator = iter(texts)
    while (request := _next_request(pool, iterator, plans)) is not None:
        yield request


def _next_request(pool: LengthPool, iterator: Iterator[str], plans: deque[Plan]) -> list[str] | None:
    while pool.wants():
        try:
            pool.add(next(iterator))
        except StopIteration:
            pool.end()
        except Exception as exc:  # the input failed (or held a non-string)
            pool.end(exc)
    return pool.next_request(plans)


async def async_sorted_requests(
    texts: AsyncIterable[str], batch_size: int, lookahead: int, plans: deque[Plan]
) -> AsyncIterator[list[str]]:
    """:func:`sorted_requests` for an async iterable."""
    pool = LengthPool(batch_size, lookahead)
    iterator = aiter(texts)
    while (request := await _next_async_request(pool, iterator, plans)) is not None:
        yield request


async def _next_async_request(
    pool: LengthPool, iterator: AsyncIterator[str], plans: deque[Plan]
) -> list[str] | None:
    while pool.wants():
        try:
            pool.add(await anext(iterator))
        except StopAsyncIteration:
            pool.end()
        except Exception as exc:  # the input failed (or held a non-string)
            pool.end(exc)
    return pool.next_request(plans)


class Reorder:
    """The reorder buffer: results of sorted requests in, the in-order prefix of finished inputs out.

    Holds only rows that cannot go out yet (fewer than the look-ahead, see the
    module's docstring); ``received`` counts every row that came back.
    """

    def __init__(self, plans: deque[Plan]) -> None:
        self.plans = plans
        self.next = 0  # the first input not yet handed out
        self.arrived: set[int] = set()  # positions held back
        self.held: list[tuple[Plan, Embeddings]] = []  # rows held back, with their positions
        self.received = 0

    def add(self, result: Embeddings) -> Embeddings | None:
        """The newly finished in-order inputs (offset: the first one's position), or None if none."""
        positions = self.plans.popleft()
        self.received += len(positions)
        self.arrived.update(positions.tolist())
        self.held.append((positions, result))
        end = self.next
        while end in self.arrived:
            self.arrived.discard(end)
            end += 1
        if end == self.next:
            return None
        return self._hand_out(end)

    def _hand_out(self, end: int) -> Embeddings:
        """Rows ``next..end-1``, gathered from the held results; what stays is cut down to itself."""
        out_positions: list[np.ndarray] = []
        out_parts: list[Embeddings] = []
        kept: list[tuple[Plan, Embeddings]] = []
        tokens, request_ids = 0, list[str]()
        for positions, result in self.held:
            going = positions < end
            if not going.any():
                kept.append((positions, result))
                continue
            if going.all():
                out_positions.append(positions)
                out_parts.append(result)
                tokens += result.prompt_tokens  # a request's usage counts once, when its last row goes
                request_ids.extend(result.request_ids)
                continue
            rows = np.flatnonzero(going)
            out_positions.append(positions[rows])
            out_parts.append(take(result, rows))
            staying = np.flatnonzero(~going)
            kept.append((positions[staying], take(result, staying, result.prompt_tokens, result.request_ids)))
        self.held = kept
        merged = concatenate(out_parts)
        order = np.argsort(np.concatenate(out_positions), kind="stable")
        chunk = take(merged, order, tokens, tuple(request_ids))
        chunk.offset = self.next
        self.next = end
        return chunk

    def locate(self, error: EmbeddingError) -> EmbeddingError:
        """Point a failed request's error at the inputs it really held (the oldest unanswered request)."""
        if self.plans:
            error.indices = [int(i) for i in self.plans[0]]  # in the request's order
            error.offset = None
        return error


def take(
    result: Embeddings, rows: np.ndarray, prompt_tokens: int = 0, request_ids: Sequence[str] = ()
) -> Embeddings:
    """The given rows of a result, in that order (usage and ids as given: they belong to whole requests)."""

    def matrix(array: np.ndarray | None) -> np.ndarray | None:
        return None if array is None else array[rows]

    def items(values: Sequence[Any] | None) -> list[Any] | None:
        return None if values is None else [values[i] for i in rows.tolist()]

    return Embeddings(
        model=result.model,
        count=len(rows),
        dense=matrix(result.dense),
        sparse=items(result.sparse),
        colbert=items(result.colbert),
        binary=matrix(result.binary),
        prompt_tokens=prompt_tokens,
        offset=result.offset,
        request_ids=tuple(request_ids),
    )


class SortedRun:
    """A StreamRun over sorted requests, handing out each reply's newly finished inputs in input order."""

    def __init__(self, inner: Any, plans: deque[Plan]) -> None:
        self.inner = inner
        self.reorder = Reorder(plans)

    @property
    def stats(self) -> Any:
        return self.inner.stats

    @property
    def received(self) -> int:
        """Inputs embedded so far, handed out or not."""
        return self.reorder.received

    def __iter__(self) -> Iterator[Embeddings]:
        results = iter(self.inner)
        while True:
            try:
                result = next(results)
            except StopIteration:
                return
            except EmbeddingError as error:
                raise (self.reorder.locate(error) if error.request_id is not None else error) from None
            chunk = self.reorder.add(result)
            if chunk is not None:
                yield chunk

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> SortedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSortedRun:
    """:class:`SortedRun` for an AsyncStreamRun."""

    def __init__(self, inner: Any, plans: deque[Plan]) -> None:
        self.inner = inner
        self.reorder = Reorder(plans)

    @property
    def stats(self) -> Any:
        return self.inner.stats

    @property
    def received(self) -> int:
        return self.reorder.received

    async def __aiter__(self) -> AsyncIterator[Embeddings]:
        results = self.inner.__aiter__()
        while True:
            try:
                result = await results.__anext__()
            except StopAsyncIteration:
                return
            except EmbeddingError as error:
                raise (self.reorder.locate(error) if error.request_id is not None else error) from None
            chunk = self.reorder.add(result)
            if chunk is not None:
                yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> AsyncSortedRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
