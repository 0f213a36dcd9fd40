"""What every embed call shares: its options, the request message, and input batching."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import cast

from .enums import (
    Output,
    OutputLike,
    Priority,
    PriorityLike,
    Task,
    TaskLike,
    parse_outputs,
    parse_priority,
    parse_task,
)
from .proto import embedding_pb2 as pb

DEFAULT_BATCH_SIZE = 64
#: A request stops growing past this many characters, so a few huge texts do
#: not make one message of tens of MiB (the server's default limit is 64 MiB).
DEFAULT_MAX_BATCH_CHARS = 1_000_000


@dataclass(frozen=True)
class EmbedOptions:
    """Everything of an EmbedRequest except its inputs, parsed and checked once."""

    model: str = ""
    task: Task = Task.UNSPECIFIED
    dimensions: int = 0
    outputs: tuple[Output, ...] = (Output.DENSE,)
    late_chunking: bool = False
    truncate: bool = False
    priority: Priority = Priority.UNSPECIFIED

    @classmethod
    def build(
        cls,
        model: str | None = None,
        task: TaskLike = None,
        dimensions: int | None = None,
        outputs: OutputLike | Iterable[OutputLike] | None = None,
        late_chunking: bool = False,
        truncate: bool = False,
        priority: PriorityLike = None,
    ) -> EmbedOptions:
        dims = 0 if dimensions is None else dimensions
        if isinstance(dims, bool) or not isinstance(dims, int) or not 0 <= dims < 2**32:
            raise ValueError(f"dimensions: expected a non-negative int, got {dimensions!r}")
        return cls(
            model=model or "",
            task=parse_task(task),
            dimensions=dims,
            outputs=parse_outputs(outputs),
            late_chunking=bool(late_chunking),
            truncate=bool(truncate),
            priority=parse_priority(priority),
        )

    def request(self, texts: list[str], request_id: str = "") -> pb.EmbedRequest:
        return pb.EmbedRequest(
            request_id=request_id,
            model=self.model,
            inputs=texts,
            # protoc's stubs type enum fields as their wrapper class; the IntEnum values are the same ints
            task=cast(pb.Task, int(self.task)),
            dimensions=self.dimensions,
            late_chunking=self.late_chunking,
            outputs=[cast(pb.OutputType, int(o)) for o in self.outputs],
            truncate=self.truncate,
            priority=cast(pb.Priority, int(self.priority)),
        )


def as_text_list(texts: str | Iterable[str]) -> list[str]:
    """A list of strings; a lone string is one text (not its characters)."""
    items = [texts] if isinstance(texts, str) else list(texts)
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"inputs[{i}]: expected str, got {type(text).__name__}")
    return items


def request_parts(texts: str | Iterable[str], late_chunking: bool, batch_size: int) -> list[list[str]]:
    """The inputs of each request of one ``embed`` call, in order (a late-chunked document stays whole)."""
    items = as_text_list(texts)
    size = len(items) if late_chunking else batch_size
    return [items[i : i + size] for i in range(0, len(items), size)] or [[]]


def batches(
    texts: Iterable[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_chars: int = DEFAULT_MAX_BATCH_CHARS,
) -> Iterator[list[str]]:
    """Consecutive texts in lists of at most ``batch_size`` (and about ``max_chars``), lazily.

    Pulls one text at a time, so a generator of any length is never held whole;
    a full batch goes out at once, without waiting for the next text. If the
    input raises, the texts before the failure still come out first.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    batcher = Batcher(batch_size, max_chars)
    failure: Exception | None = None
    iterator = iter([texts] if isinstance(texts, str) else texts)
    while True:
        try:
            complete = batcher.add(next(iterator))
        except StopIteration:
            break
        except Exception as exc:  # the input failed (or held a non-string)
            failure = exc
            break
        yield from complete
    if batcher.batch:
        yield batcher.batch
    if failure is not None:
        raise failure


class Batcher:
    """Groups texts into requests; shared by the sync and the async input paths."""

    def __init__(self, batch_size: int, max_chars: int) -> None:
        self.batch_size = batch_size
        self.max_chars = max_chars
        self.batch: list[str] = []
        self.chars = 0
        self.position = 0

    def add(self, text: object) -> list[list[str]]:
        """The batches that are complete once ``text`` is added (none, one or two)."""
        if not isinstance(text, str):
            raise TypeError(f"inputs[{self.position}]: expected str, got {type(text).__name__}")
        self.position += 1
        done = []
        if self.batch and self.chars + len(text) > self.max_chars:
            done.append(self._take())
        self.batch.append(text)
        self.chars += len(text)
        if len(self.batch) >= self.batch_size:
            done.append(self._take())
        return done

    def _take(self) -> list[str]:
        batch, self.batch, self.chars = self.batch, [], 0
        return batch
