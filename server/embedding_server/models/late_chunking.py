"""Late chunking: one vector per chunk, each pooled from token states that saw the whole document.

The chunks of a request are joined with single spaces behind the task prefix
and tokenized once. Each ordinary token belongs to the first chunk whose end
character it does not pass; ``<s>`` joins the first span and ``</s>`` the
last, so the spans cover the sequence contiguously (models.md).

A document longer than the model's window runs as overlapping windows, each
a well-formed model input ``<s> + C[s_k:e_k] + </s>`` (models.md, "Late
chunking beyond the window"). Every token's state comes from exactly one
window: window 0 keeps everything up to its end, a later window drops its
first ``O`` content tokens (context only). Stitched back in order, the kept
rows are the document's token states ``H`` (N + 2 rows), and the spans are
pooled over ``H`` exactly as in the one-window case. The windows are
independent model inputs, so the batcher runs them like any other work;
everything here is pure numpy and index arithmetic. Stitching ``H`` and
pooling the spans is part of the finish step (engine/finish.py).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from .refusals import EmptyChunk
from .tokenization import TokenizedText

SEPARATOR = " "
#: --max-document-tokens 0: a model accepts documents of this many windows.
DEFAULT_DOCUMENT_WINDOWS = 16
DEFAULT_OVERLAP = 256


def join_chunks(prefix: str, chunks: list[str]) -> tuple[str, list[int]]:
    """The document text and the character end of each chunk in it."""
    ends: list[int] = []
    position = len(prefix)
    for chunk in chunks:
        position += len(chunk)
        ends.append(position)
        position += len(SEPARATOR)
    return prefix + SEPARATOR.join(chunks), ends


def chunk_spans(document: TokenizedText, chunk_ends: list[int]) -> list[tuple[int, int]]:
    """Token spans [start, end) of each chunk; every chunk gets at least one token."""
    owners: list[int] = []
    for offset, special in zip(document.offsets, document.special, strict=True):
        if special:
            owners.append(-1)  # placed below: <s> with the first span, </s> with the last
            continue
        owners.append(min(bisect.bisect_left(chunk_ends, offset[1]), len(chunk_ends) - 1))
    counts = [0] * len(chunk_ends)
    for owner in owners:
        if owner >= 0:
            counts[owner] += 1
    for index, count in enumerate(counts):
        if count == 0:
            raise EmptyChunk(index)
    return _contiguous_spans(owners)


def _contiguous_spans(owners: list[int]) -> list[tuple[int, int]]:
    """Spans from the owners (non-decreasing): the first from 0, the last to the end."""
    boundaries: list[int] = []
    last_owner = 0
    for position, owner in enumerate(owners):
        if owner > last_owner:
            boundaries.extend([position] * (owner - last_owner))
            last_owner = owner
    starts = [0, *boundaries]
    ends = [*boundaries, len(owners)]
    return list(zip(starts, ends, strict=True))


# --- windows ------------------------------------------------------------------------------


def document_limit(max_tokens: int, setting: int) -> int:
    """The longest document (tokens, N + 2) a model late-chunks: ``setting``, or 16 windows."""
    return setting or DEFAULT_DOCUMENT_WINDOWS * max_tokens


def content_windows(content_tokens: int, capacity: int, overlap: int) -> list[tuple[int, int]]:
    """Windows [s_k, e_k) over N content tokens: K = capacity a window, O = min(overlap, K // 2).

    s_0 = 0; e_k = min(s_k + K, N); s_{k+1} = e_k - O; the last window ends at N.
    """
    if capacity < 1:
        raise ValueError(f"a window needs room for at least one content token, got {capacity}")
    step_back = min(overlap, capacity // 2)
    windows = [(0, min(capacity, content_tokens))]
    while windows[-1][1] < content_tokens:
        start = windows[-1][1] - step_back
        windows.append((start, min(start + capacity, content_tokens)))
    return windows


@dataclass(frozen=True)
class Window:
    """One model input of a document and the rows of its token states that go into H."""

    ids: np.ndarray  # int64: <s> + C[start:end] + </s>
    keep: tuple[int, int]  # rows [a, b) of this window's states that H takes


@dataclass(frozen=True)
class LateChunkedDocument:
    """A tokenized document ready to run: its windows and its chunks' spans over H."""

    windows: list[Window]
    spans: list[tuple[int, int]]  # [start, end) rows of H per chunk
    tokens: int  # N + 2: the document's tokens with its special tokens (usage.prompt_tokens)


def plan_document(
    document: TokenizedText, spans: list[tuple[int, int]], max_tokens: int, overlap: int
) -> LateChunkedDocument:
    """Cut a tokenized document (``<s> C </s>``) into windows of at most ``max_tokens`` tokens."""
    ids = document.ids
    head, tail = _added_specials(document)
    content = ids[head : len(ids) - tail]
    windows = content_windows(len(content), max_tokens - head - tail, overlap)
    planned = []
    for k, (start, end) in enumerate(windows):
        last = k == len(windows) - 1
        window_ids = np.concatenate([ids[:head], content[start:end], ids[len(ids) - tail :]])
        # window 0 keeps its <s> and everything; window k > 0 keeps [e_{k-1}, e_k) = [s_k + O, e_k)
        first_kept = 0 if k == 0 else head + (windows[k - 1][1] - start)
        last_kept = head + (end - start) + (tail if last else 0)
        planned.append(Window(window_ids.astype(np.int64, copy=False), (first_kept, last_kept)))
    return LateChunkedDocument(planned, spans, len(ids))


def _added_specials(document: TokenizedText) -> tuple[int, int]:
    """How many special tokens the tokenizer put before and after the text (1 and 1 for <s> ... </s>)."""
    special = document.special
    head = 1 if len(special) and special[0] else 0
    tail = 1 if len(special) > head and special[-1] else 0
    return head, tail
