"""Plain types shared by the model families, the engine and the API layers.

Output and Priority mirror the protobuf enums by value. Task and jina's task names are the
client's (embedding_client.enums): one table, which the REST shim and the CLI read too.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
from embedding_client.enums import TASK_NAMES as TASKS_BY_NAME
from embedding_client.enums import Task

__all__ = [
    "TASK_NAMES",
    "ModelDescription",
    "Output",
    "PackedBits",
    "Priority",
    "SequenceVectors",
    "SparseWeights",
    "Task",
]


#: jina's own task names (config.json ``lora_adaptations``), by task: the client's one table, inverted.
TASK_NAMES: dict[Task, str] = {task: name for name, task in TASKS_BY_NAME.items()}


class Priority(IntEnum):
    """Scheduling class; values equal embedding.v1.Priority."""

    UNSPECIFIED = 0  # Embed: interactive; StreamEmbed: batch
    INTERACTIVE = 1
    BATCH = 2


class Output(IntEnum):
    """Output kinds; values equal embedding.v1.OutputType."""

    UNSPECIFIED = 0
    DENSE = 1
    SPARSE = 2
    COLBERT = 3
    BINARY = 4


@dataclass(frozen=True)
class ModelDescription:
    """What ListModels reports about a model."""

    name: str
    family: str
    dimensions: int
    max_tokens: int
    tasks: tuple[Task, ...] = ()
    outputs: tuple[Output, ...] = (Output.DENSE, Output.BINARY)
    matryoshka_dimensions: tuple[int, ...] = ()
    max_document_tokens: int = 0  # the longest late-chunked document accepted; 0: cannot late-chunk
    precision: str = "fp32"  # as served: "fp32", "bf16" (OpenVINO), "fp16" or "int8"
    engine: str = "onnxruntime"  # what runs it: "onnxruntime" or "openvino" (models/engines.py)


@dataclass
class SparseWeights:
    """Lexical weights of one input: token ids ascending, one weight each."""

    ids: np.ndarray  # uint32 [k]
    weights: np.ndarray  # float32 [k]


@dataclass
class PackedBits:
    """Sign bits of dense rows, ``np.packbits(v > 0)`` per row, MSB first (the binary output)."""

    bits: np.ndarray  # uint8 [rows, ceil(dimensions / 8)]
    dimensions: int  # the dense vector's size the bits came from


@dataclass(slots=True)
class SequenceVectors:
    """What the engine computed for one sequence (one input, or one window of a late-chunked document).

    A family's ``postprocess`` fills it raw: ``dense`` pooled, not yet
    truncated or normalized; ``colbert`` not yet normalized; a late-chunking
    window's ``token_states`` instead of ``dense``. The finish step
    (engine/finish.py) makes it final: Matryoshka, normalization, late chunks,
    sign bits. ``dense`` holds one row per output vector.
    """

    dense: np.ndarray | None = None  # float32 [rows, H]
    sparse: SparseWeights | None = None
    colbert: np.ndarray | None = None  # float32 [tokens, H]
    binary: PackedBits | None = None  # set by the finish step when the request asks for binary
    token_states: np.ndarray | None = None  # float32 [kept rows, H]: a late-chunking window's states
