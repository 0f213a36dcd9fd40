"""Choosing the next batch from the waiting work (a pure function, easy to test).

The oldest waiting item anchors the batch, so nothing starves. Around it,
the waiting items sorted by length are taken one neighbour at a time,
always the neighbour closest in length to the anchor, while the padded cost
(longest x count) stays within the token budget and the count within the
cap. Neighbours in length pad little.
"""

from __future__ import annotations

from .work import WorkItem


def select_batch(waiting: list[WorkItem], max_tokens: int, max_size: int) -> list[WorkItem]:
    """The items of the next batch (at least the oldest item, even if alone it exceeds the budget)."""
    if not waiting:
        return []
    by_length = sorted(waiting, key=lambda item: (item.length, item.arrival))
    anchor = min(range(len(by_length)), key=lambda i: by_length[i].arrival)
    low = high = anchor
    target = by_length[anchor].length
    while high - low + 1 < max_size:
        count = high - low + 2
        left = low - 1 if low > 0 and by_length[high].length * count <= max_tokens else None
        right = (
            high + 1
            if high + 1 < len(by_length) and by_length[high + 1].length * count <= max_tokens
            else None
        )
        if left is None and right is None:
            break
        if right is None or (
            left is not None and target - by_length[left].length <= by_length[right].length - target
        ):
            low = left  # type: ignore[assignment]
        else:
            high = right
    return by_length[low : high + 1]
