"""Late chunking: one forward pass over a whole document, one vector per chunk.

The chunks of a request are joined with single spaces behind the task prefix
and tokenized once. Each ordinary token belongs to the first chunk whose end
character it does not pass; ``<s>`` joins the first span and ``</s>`` the
last, so the spans cover the sequence contiguously (models.md).
"""

from __future__ import annotations

import bisect

from ..errors import InvalidArgument
from .tokenization import TokenizedText

SEPARATOR = " "


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
            raise InvalidArgument(
                f"inputs[{index}]: chunk has no tokens of its own",
                field="inputs",
                index=index,
                reason="EMPTY_CHUNK",
            )
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
