"""What one session run of a model costs on this machine, from the runs it has made.

The batcher asks it whether a run is cheap enough to make on the event loop
(``BatchSettings.inline_run_ms``): handing a run to a run thread and back
costs ~0.5 ms of CPU in a busy server (the executor's queue, two wake-ups of
the loop, and the GIL passed to the run thread and back three times;
bench/serving_path.py), which is most of what a tiny model's whole call
costs, and nothing next to a real model's run. No CPU's speed is assumed: the
estimate is this model's own runs, measured around the session call.

The least time seen, not an average: other threads and tenants only ever add
to a run's time, so the minimum is the model's own cost, and a busy spell
cannot talk the batcher out of running on the loop. Two minima, because a
run's cost is a fixed part plus a part linear in padded tokens (batch
selection's docstring): the cheapest run bounds the fixed part, the least
seconds per padded token the rest; a run is predicted at the larger of the
two. Until a model has run once, nothing is cheap.

Event loop only: the batcher records each run when it is back on the loop.
"""

from __future__ import annotations

import math


class RunCost:
    """Seconds a session run of ``padded_tokens`` takes, predicted from the runs recorded so far."""

    def __init__(self) -> None:
        self.cheapest = math.inf  # seconds of the cheapest run seen
        self.per_token = math.inf  # least seconds per padded token seen

    def record(self, padded_tokens: int, seconds: float) -> None:
        self.cheapest = min(self.cheapest, seconds)
        self.per_token = min(self.per_token, seconds / max(1, padded_tokens))

    def predict(self, padded_tokens: int) -> float:
        """Never below the cheapest run: a small run pays the fixed part whatever its size."""
        return max(self.cheapest, self.per_token * padded_tokens)
