"""Choosing the next batch from the waiting work (a pure function, easy to test).

The oldest waiting item anchors the batch, so nothing starves. Around it,
the waiting items sorted by length are taken one neighbour at a time,
always the neighbour closest in length to the anchor, while three limits
hold: the padded cost (longest x count) within the token budget, the count
within the cap, and the padding a neighbour adds within ``max_waste``.

The last limit is what CPU inference needs. A run's cost is close to linear
in padded tokens (all-MiniLM-L6-v2, 1 thread: ~165 us a token at any batch
size from 4 up) with a fixed part of only ~1.3 ms (~8 tokens) per run, so a
neighbour whose padding costs more than a run of its own is better left for
another batch of its own length.

A fourth limit is memory: ``run_fits(count, longest)`` says whether a run of
that shape fits one run's share of the memory budget (attention grows with
the square of ``longest``, so long sequences get fewer rows than short ones).
"""

from __future__ import annotations

from collections.abc import Callable

from .work import WorkItem


def select_batch(
    waiting: list[WorkItem],
    max_tokens: int,
    max_size: int,
    max_waste: int = 0,
    run_fits: Callable[[int, int], bool] | None = None,
) -> list[WorkItem]:
    """The items of the next batch (at least the oldest, even if alone it exceeds the budget).

    ``max_waste``: the most padding tokens one neighbour may add (0: no limit);
    ``run_fits``: the memory check of a run of ``count`` rows padded to ``longest``.
    """
    if not waiting:
        return []
    by_length = sorted(waiting, key=lambda item: (item.length, item.arrival))
    lengths = [item.length for item in by_length]  # read many times below: a list, not attributes
    anchor = min(range(len(by_length)), key=lambda i: by_length[i].arrival)
    low = high = anchor
    target = lengths[anchor]

    def fits(index: int) -> bool:
        count = high - low + 1
        longest = max(lengths[high], lengths[index])
        if longest * (count + 1) > max_tokens:
            return False
        if run_fits is not None and not run_fits(count + 1, longest):
            return False
        added_padding = longest * (count + 1) - lengths[high] * count - lengths[index]
        return not max_waste or added_padding <= max_waste

    last = len(lengths) - 1
    while high - low + 1 < max_size:
        # The neighbour closer in length to the anchor first (the left on a tie); the farther one
        # only when the closer does not fit: one check a step where both used to be made.
        left_first = low > 0 and (high == last or target - lengths[low - 1] <= lengths[high + 1] - target)
        if left_first and fits(low - 1):
            low -= 1
        elif high < last and fits(high + 1):
            high += 1
        elif not left_first and low > 0 and fits(low - 1):
            low -= 1
        else:
            break
    return by_length[low : high + 1]
