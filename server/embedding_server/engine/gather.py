"""Letting a batch fill while the event loop is still reading requests in.

A request reaches the work queue several event-loop steps after its bytes
arrive (gRPC reads the call and its message, the interceptor and the handler
run, the inputs tokenize). A dispatcher that takes the queue the moment the
first request lands runs it alone: under 16 concurrent single-input calls
every run held one request, and each paid a run's fixed cost (the session
call, padding, the finish step, metrics) on its own.

So before it takes a batch the dispatcher yields to the loop until the loop
has been idle for ``QUIET_ITERATIONS`` iterations in a row, up to a time limit
(``batch_gather_ms``), or until a whole batch waits. A yield that comes back
at the cost of an empty loop iteration ran nothing else. What an empty
iteration costs is measured here, on this machine: the cheapest yield seen.
An idle server's lone query pays those empty iterations (tens of
microseconds); a busy loop spends the wait on the other requests' steps,
which is work it had to do anyway.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

#: A yield that took more than this many times an empty iteration ran other work.
BUSY_FACTOR = 4.0
#: Empty iterations in a row that make the loop idle. One is not enough: gRPC's poller thread hands
#: the loop a call's next event a few iterations later, so a loop that looks idle for one iteration
#: often has requests on their way (16 x 1 calls, tiny model: 1.6 requests a run at 1, 4.8 at 16).
QUIET_ITERATIONS = 16


class LoopGather:
    """Yields while the event loop is busy; owns the measured cost of an empty iteration."""

    def __init__(self, limit_seconds: float) -> None:
        self.limit = limit_seconds
        self.empty_iteration = math.inf  # seconds: the cheapest yield seen

    async def wait(self, full: Callable[[], bool]) -> bool:
        """Yield until the loop is idle, ``full()`` says the batch cannot grow, or the limit passes.

        Returns whether it yielded at all (what waits may have changed meanwhile).
        """
        if self.limit <= 0 or full():
            return False
        now = time.perf_counter()
        end = now + self.limit
        quiet = 0
        while True:
            await asyncio.sleep(0)
            then, now = now, time.perf_counter()
            spent = now - then
            self.empty_iteration = min(self.empty_iteration, spent)
            quiet = quiet + 1 if spent <= BUSY_FACTOR * self.empty_iteration else 0
            if quiet >= QUIET_ITERATIONS or now >= end or full():
                return True
