"""An EngineObserver that keeps what the engine reported: the tests read events, not engine internals."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from embedding_server.models.types import Priority


@dataclass(frozen=True)
class BatchEvent:
    model: str
    size: int
    real_tokens: int
    padded_tokens: int
    priority: Priority
    wide: bool


@dataclass
class RecordingObserver:
    batches: list[BatchEvent] = field(default_factory=list)
    requests: list[tuple[str, Priority]] = field(default_factory=list)
    refused: Counter[tuple[str, Priority, str]] = field(default_factory=Counter)
    dropped: Counter[tuple[str, Priority, str]] = field(default_factory=Counter)

    def on_batch(
        self,
        model: str,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        seconds: float,
        priority: Priority = Priority.INTERACTIVE,
        wide: bool = False,
    ) -> None:
        self.batches.append(BatchEvent(model, size, real_tokens, padded_tokens, priority, wide))

    def on_request(
        self,
        model: str,
        queue_seconds: float,
        inference_seconds: float,
        priority: Priority = Priority.INTERACTIVE,
    ) -> None:
        self.requests.append((model, priority))

    def on_refused(self, model: str, priority: Priority, reason: str) -> None:
        self.refused[model, priority, reason] += 1

    def on_dropped(self, model: str, priority: Priority, reason: str, count: int) -> None:
        self.dropped[model, priority, reason] += count

    def sequences(self, model: str) -> int:
        """Sequences run for ``model``, every run together."""
        return sum(event.size for event in self.batches if event.model == model)

    def total(self, counts: Counter[tuple[str, Priority, str]], reason: str) -> int:
        """Events of one reason, every model and class together."""
        return sum(n for (_, _, why), n in counts.items() if why == reason)
