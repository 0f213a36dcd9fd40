"""Plain types shared by the model families, the engine and the API layers.

Task and Output mirror the protobuf enums by value, so the engine does not
depend on generated code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Task(IntEnum):
    """jina-v3 LoRA tasks; values equal embedding.v1.Task."""

    UNSPECIFIED = 0
    RETRIEVAL_QUERY = 1
    RETRIEVAL_PASSAGE = 2
    SEPARATION = 3
    CLASSIFICATION = 4
    TEXT_MATCHING = 5


#: jina's own task names (config.json ``lora_adaptations``), also used by the REST shim.
TASK_NAMES: dict[Task, str] = {
    Task.RETRIEVAL_QUERY: "retrieval.query",
    Task.RETRIEVAL_PASSAGE: "retrieval.passage",
    Task.SEPARATION: "separation",
    Task.CLASSIFICATION: "classification",
    Task.TEXT_MATCHING: "text-matching",
}


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
    precision: str = "fp32"  # the weights as served: "fp32", "fp16" or "int8"


@dataclass
class SparseWeights:
    """Lexical weights of one input: token ids ascending, one weight each."""

    ids: np.ndarray  # uint32 [k]
    weights: np.ndarray  # float32 [k]


@dataclass
class SequenceVectors:
    """What the model computed for one sequence (one input, or one window of a late-chunked document).

    ``dense`` holds one row per output vector: one for a plain input, one per
    chunk once a late-chunked document is pooled. It is pooled but not yet
    truncated or normalized (Matryoshka truncates first, then normalizes).
    A late-chunking window comes back as ``token_states`` instead.
    """

    dense: np.ndarray | None = None  # float32 [rows, H]
    sparse: SparseWeights | None = None
    colbert: np.ndarray | None = None  # float32 [tokens, H], rows normalized
    token_states: np.ndarray | None = None  # float32 [kept rows, H]: a late-chunking window's states
    extra: dict[str, object] = field(default_factory=dict)
