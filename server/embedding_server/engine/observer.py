"""What the engine reports as it works, where each event happens (implemented by metrics.Metrics)."""

from __future__ import annotations

from typing import Protocol

from ..models.types import Priority


class EngineObserver(Protocol):
    """Admission reports refusals, the work queue drops, the dispatcher runs, the Embedder requests."""

    def on_batch(
        self,
        model: str,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        seconds: float,
        priority: Priority = Priority.INTERACTIVE,
        wide: bool = False,
    ) -> None: ...

    def on_request(
        self,
        model: str,
        queue_seconds: float,
        inference_seconds: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> None: ...

    def on_refused(self, model: str, priority: Priority, reason: str) -> None: ...

    def on_dropped(self, model: str, priority: Priority, reason: str, count: int) -> None: ...
