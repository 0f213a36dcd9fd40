"""Checks on request values; each failure names the field (and the input index)."""

from __future__ import annotations

from ..errors import InvalidArgument
from ..models.base import EmbeddingModel
from ..models.refusals import DocumentTooLong, EmptyChunk, InputTooLong, UnsupportedTask
from ..models.types import ModelDescription, Output, Task
from .jobs import EmbedJob

LATE_CHUNKING_OUTPUTS = frozenset({Output.DENSE, Output.BINARY})


def check_inputs(inputs: list[str], max_inputs: int, late_chunking: bool = False) -> None:
    if not inputs:
        raise InvalidArgument("inputs: must not be empty", field="inputs", reason="EMPTY_INPUT")
    if len(inputs) > max_inputs:
        raise InvalidArgument(
            f"inputs: {len(inputs)} inputs exceeds the limit of {max_inputs} per request",
            field="inputs",
            reason="TOO_MANY_INPUTS",
        )
    for index, text in enumerate(inputs):
        if not text:
            raise InvalidArgument(
                f"inputs[{index}]: must not be empty", field="inputs", index=index, reason="EMPTY_INPUT"
            )
        if late_chunking and not text.strip():
            raise InvalidArgument(
                f"inputs[{index}]: a late-chunking chunk must not be whitespace only",
                field="inputs",
                index=index,
                reason="EMPTY_CHUNK",
            )


def parse_task(value: int, model: EmbeddingModel) -> Task:
    try:
        task = Task(value)
    except ValueError:
        raise InvalidArgument(f"task: unknown value {value}", field="task", reason="UNKNOWN_TASK") from None
    with model_refusals(model.name):
        model.check_task(task)
    return task


class model_refusals:  # used as a function: ``with model_refusals(name):``
    """What the model layer refuses (models/refusals.py), as the request field it comes from.

    A class, not ``@contextmanager``: every request enters it twice, and the generator's
    machinery cost 2.1 us an entry against 0.4.
    """

    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, traceback: object) -> None:
        error = None if exc is None else _as_invalid_argument(self.model, exc)
        if error is not None:
            raise error from None
        # anything else goes on as it was raised


def _as_invalid_argument(model: str, exc: BaseException) -> InvalidArgument | None:
    """A model refusal as the InvalidArgument of its field; None for any other exception."""
    if isinstance(exc, UnsupportedTask):
        return InvalidArgument(
            f"task: {exc.task_name} is not one of this model's adapters {list(exc.adapters)}",
            field="task",
            reason="UNSUPPORTED_TASK",
        )
    if isinstance(exc, InputTooLong):
        return InvalidArgument(
            f"inputs[{exc.index}]: {exc.tokens} tokens exceeds the model's maximum of "
            f"{exc.max_tokens}; shorten it or set truncate",
            field="inputs",
            index=exc.index,
            reason="INPUT_TOO_LONG",
        )
    if isinstance(exc, DocumentTooLong):
        return InvalidArgument(
            f"inputs: late chunking: the document has {exc.tokens} tokens, over model "
            f"{model}'s limit of {exc.limit} (--max-document-tokens)",
            field="inputs",
            reason="DOCUMENT_TOO_LONG",
        )
    if isinstance(exc, EmptyChunk):
        return InvalidArgument(
            f"inputs[{exc.index}]: chunk has no tokens of its own",
            field="inputs",
            index=exc.index,
            reason="EMPTY_CHUNK",
        )
    return None


def parse_outputs(values: list[int], description: ModelDescription) -> tuple[Output, ...]:
    """The requested outputs in order, UNSPECIFIED read as DENSE, each at most once."""
    if not values:
        return (Output.DENSE,)
    outputs: list[Output] = []
    for index, value in enumerate(values):
        try:
            output = Output(value)
        except ValueError:
            raise InvalidArgument(
                f"outputs[{index}]: unknown value {value}",
                field="outputs",
                index=index,
                reason="UNKNOWN_OUTPUT",
            ) from None
        output = Output.DENSE if output == Output.UNSPECIFIED else output
        if output in outputs:
            raise InvalidArgument(
                f"outputs[{index}]: OUTPUT_TYPE_{output.name} is requested twice",
                field="outputs",
                index=index,
                reason="DUPLICATE_OUTPUT",
            )
        if output not in description.outputs:
            produced = ", ".join(f"OUTPUT_TYPE_{o.name}" for o in description.outputs)
            raise InvalidArgument(
                f"outputs[{index}]: model {description.name} does not produce OUTPUT_TYPE_{output.name} "
                f"(it produces {produced})",
                field="outputs",
                index=index,
                reason="UNSUPPORTED_OUTPUT",
            )
        outputs.append(output)
    return tuple(outputs)


def check_dimensions(dimensions: int, description: ModelDescription) -> None:
    if dimensions == 0:
        return
    allowed = description.matryoshka_dimensions
    if allowed and dimensions not in allowed:
        raise InvalidArgument(
            f"dimensions: {dimensions} is not one of model {description.name}'s Matryoshka sizes "
            f"{list(allowed)} (0 = full size)",
            field="dimensions",
            reason="BAD_DIMENSIONS",
        )
    if not 1 <= dimensions <= description.dimensions:
        raise InvalidArgument(
            f"dimensions: {dimensions} is out of range 1..{description.dimensions} for model "
            f"{description.name} (0 = full size)",
            field="dimensions",
            reason="BAD_DIMENSIONS",
        )


def check_late_chunking(job: EmbedJob, model: EmbeddingModel, outputs: tuple[Output, ...]) -> None:
    if not job.late_chunking:
        return
    if not model.supports_late_chunking:
        raise InvalidArgument(
            f"late_chunking: model {model.name}'s graph has no token states to chunk",
            field="late_chunking",
            reason="LATE_CHUNKING_UNSUPPORTED",
        )
    extra = [i for i, o in enumerate(outputs) if o not in LATE_CHUNKING_OUTPUTS]
    if extra:
        raise InvalidArgument(
            f"outputs[{extra[0]}]: late_chunking gives dense or binary vectors only, "
            f"not OUTPUT_TYPE_{outputs[extra[0]].name}",
            field="outputs",
            index=extra[0],
            reason="UNSUPPORTED_OUTPUT",
        )
