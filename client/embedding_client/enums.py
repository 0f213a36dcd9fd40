"""Tasks and output kinds: the protobuf enums, also spelled the way users spell them.

A task can be given as :class:`Task`, as an ``embedding.v1.Task`` value, or as
jina's adapter name (``"retrieval.query"``); an output as :class:`Output`, an
``embedding.v1.OutputType`` value or a word (``"dense"``, ``"sparse"``,
``"colbert"``, ``"binary"``). Parsing happens here once, so a typo fails on the
client with a message listing the choices instead of travelling to the server.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum
from typing import TypeVar

from .proto import embedding_pb2 as pb


class Task(IntEnum):
    """jina-embeddings-v3 tasks; values equal ``embedding.v1.Task``."""

    UNSPECIFIED = pb.TASK_UNSPECIFIED
    RETRIEVAL_QUERY = pb.TASK_RETRIEVAL_QUERY
    RETRIEVAL_PASSAGE = pb.TASK_RETRIEVAL_PASSAGE
    SEPARATION = pb.TASK_SEPARATION
    CLASSIFICATION = pb.TASK_CLASSIFICATION
    TEXT_MATCHING = pb.TASK_TEXT_MATCHING


class Output(IntEnum):
    """Vector kinds; values equal ``embedding.v1.OutputType``."""

    DENSE = pb.OUTPUT_TYPE_DENSE
    SPARSE = pb.OUTPUT_TYPE_SPARSE
    COLBERT = pb.OUTPUT_TYPE_COLBERT
    BINARY = pb.OUTPUT_TYPE_BINARY


class Priority(IntEnum):
    """Scheduling class; values equal ``embedding.v1.Priority``.

    INTERACTIVE work (queries) runs ahead of BATCH work (corpus jobs), which
    the server shares fairly between clients. UNSPECIFIED: interactive for
    ``embed``, batch for the streaming calls.
    """

    UNSPECIFIED = pb.PRIORITY_UNSPECIFIED
    INTERACTIVE = pb.PRIORITY_INTERACTIVE
    BATCH = pb.PRIORITY_BATCH


#: jina's names for its LoRA adapters (also the REST shim's ``task`` values).
TASK_NAMES: dict[str, Task] = {
    "retrieval.query": Task.RETRIEVAL_QUERY,
    "retrieval.passage": Task.RETRIEVAL_PASSAGE,
    "separation": Task.SEPARATION,
    "classification": Task.CLASSIFICATION,
    "text-matching": Task.TEXT_MATCHING,
}
OUTPUT_NAMES: dict[str, Output] = {output.name.lower(): output for output in Output}

E = TypeVar("E", bound=IntEnum)

TaskLike = Task | int | str | None
OutputLike = Output | int | str
PriorityLike = Priority | int | str | None


def parse_priority(priority: PriorityLike) -> Priority:
    """A Priority from the enum, its protobuf value or its name (``"interactive"``, ``"batch"``)."""
    if priority is None:
        return Priority.UNSPECIFIED
    if isinstance(priority, str):
        name = priority.strip().upper().removeprefix("PRIORITY_")
        if name in Priority.__members__:
            return Priority[name]
        raise ValueError(f"priority: unknown priority {priority!r}; expected 'interactive' or 'batch'")
    return _member(Priority, priority, "priority", "priority")


def parse_task(task: TaskLike) -> Task:
    """A Task from the enum, its protobuf value, jina's name or the enum member's name."""
    if task is None:
        return Task.UNSPECIFIED
    if isinstance(task, str):
        key = task.strip()
        if key in TASK_NAMES:
            return TASK_NAMES[key]
        name = key.upper().replace(".", "_").replace("-", "_").removeprefix("TASK_")
        if name in Task.__members__:
            return Task[name]
        raise ValueError(f"task: unknown task {task!r}; expected one of {', '.join(TASK_NAMES)}")
    return _member(Task, task, "task", "task")


def parse_output(output: OutputLike) -> Output:
    """An Output from the enum, its protobuf value or a word like ``"sparse"``."""
    if isinstance(output, str):
        name = output.strip().lower().removeprefix("output_type_")
        if name in OUTPUT_NAMES:
            return OUTPUT_NAMES[name]
        raise ValueError(f"outputs: unknown output {output!r}; expected one of {', '.join(OUTPUT_NAMES)}")
    if isinstance(output, int) and not isinstance(output, bool) and output == pb.OUTPUT_TYPE_UNSPECIFIED:
        return Output.DENSE  # the proto's documented meaning
    return _member(Output, output, "outputs", "output")


def _member(enum: type[E], value: object, field: str, kind: str) -> E:
    """The enum member of a protobuf value; a bool or a non-int is a TypeError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        article = "an" if enum.__name__[0] in "AEIOU" else "a"
        raise TypeError(
            f"{field}: expected {article} {enum.__name__}, an int or a name, got {type(value).__name__}"
        )
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{field}: unknown {kind} value {value}") from None


def parse_outputs(outputs: OutputLike | Iterable[OutputLike] | None) -> tuple[Output, ...]:
    """The outputs asked for, each once, in the order given; None means dense only."""
    if outputs is None:
        return (Output.DENSE,)
    items = [outputs] if isinstance(outputs, (str, int)) else list(outputs)
    parsed: list[Output] = []
    for item in items:
        output = parse_output(item)
        if output in parsed:
            raise ValueError(f"outputs: {output.name.lower()} is listed twice")
        parsed.append(output)
    if not parsed:
        raise ValueError("outputs: empty; leave it out for dense vectors")
    return tuple(parsed)


def task_name(task: int) -> str:
    """jina's name for a task value (``"retrieval.query"``), or the enum name if it has none."""
    for name, member in TASK_NAMES.items():
        if member == task:
            return name
    try:
        return Task(task).name.lower()
    except ValueError:
        return str(task)


def output_name(output: int) -> str:
    try:
        return Output(output).name.lower()
    except ValueError:
        return str(output)
