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
#: A batch whose run will be made on the event loop (a cheap run, ``inline_run_ms``) may wait, while the
#: loop is busy, this many times what the loop's cheapest run on it cost (its fixed part: the session
#: call's own, padding, the finish step, the replies, the metrics). The cheapest run is a lone
#: sequence's, less than what a run costs the loop under load (the dispatcher's choice, the gather's
#: own yields, fuller finish steps), so the factor is where throughput levels off: bench/serving_path.py
#: (AMD EPYC, 2 CPUs, tiny bge-m3, cheapest run 155 us) gave 1.09-1.12x texts/s at 2-4 ms against 1 ms
#: (batches of 28-39 sequences instead of 18), and 16 x 155 us is 2.5 ms.
AMORTIZE = 16
#: Empty iterations in a row that make the loop idle. One is not enough: gRPC's poller thread hands
#: the loop a call's next event a few iterations later, so a loop that looks idle for one iteration
#: often has requests on their way (16 x 1 calls, tiny model: 1.6 requests a run at 1, 4.8 at 16).
QUIET_ITERATIONS = 16


class LoopGather:
    """Yields while the event loop is busy; owns the measured costs of an empty iteration and of the
    cheapest run made on the loop."""

    def __init__(self, limit_seconds: float) -> None:
        self.limit = limit_seconds
        self.empty_iteration = math.inf  # seconds: the cheapest yield seen
        self.cheapest_loop_run = math.inf  # seconds of loop time the cheapest run made on the loop took

    def record_loop_run(self, seconds: float) -> None:
        """A run made on the loop took it ``seconds`` (the least seen is its fixed part: a busy
        machine only ever adds)."""
        self.cheapest_loop_run = min(self.cheapest_loop_run, seconds)

    def limit_for(self, on_loop: bool) -> float:
        """How long a batch may wait while the loop is busy: ``limit``; for a run on the loop, long
        enough to pay its fixed part ``AMORTIZE`` times over, if that is longer.

        A run on a thread leaves the loop free, and waiting longer for it would leave its session
        idle; a run on the loop stops everything else, so while the loop is the bottleneck each run
        less is loop time won, and the wait costs nothing but latency (an idle loop ends it at once).
        """
        if self.limit <= 0 or not on_loop or math.isinf(self.cheapest_loop_run):
            return self.limit
        return max(self.limit, AMORTIZE * self.cheapest_loop_run)

    async def wait(
        self, full: Callable[[], bool], on_loop: bool = False, waiting: Callable[[], int] = lambda: 0
    ) -> bool:
        """Yield until the loop is idle, ``full()`` says the batch cannot grow, or the limit passes
        (``limit_for(on_loop)``; ``on_loop``: the run is expected to be made on the loop).

        Past ``limit`` the wait goes on only while the batch grows: each further ``limit`` must
        bring more work (``waiting()``, the batch's class; by default nothing grows), so a lone
        query on a loop kept busy by other work (a corpus job's stream) waits ``limit``, not the
        longer wait meant for a flood of requests. Returns whether it yielded at all (what waits
        may have changed meanwhile).
        """
        limit = self.limit_for(on_loop)
        if limit <= 0 or full():
            return False
        now = time.perf_counter()
        end, checkpoint = now + limit, now + self.limit
        seen = waiting()
        quiet = 0
        while True:
            await asyncio.sleep(0)
            then, now = now, time.perf_counter()
            spent = now - then
            self.empty_iteration = min(self.empty_iteration, spent)
            quiet = quiet + 1 if spent <= BUSY_FACTOR * self.empty_iteration else 0
            if quiet >= QUIET_ITERATIONS or now >= end or full():
                return True
            if now >= checkpoint:
                grown = waiting()
                if grown <= seen:
                    return True
                seen, checkpoint = grown, now + self.limit
