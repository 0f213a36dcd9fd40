"""The interface every model family implements, and what they share.

A family turns a padded batch into ONNX feeds, and the session outputs back
into per-sequence vectors. Everything else (queueing, batching, sessions,
Matryoshka, binary packing, the wire format) is family-agnostic and lives in
the engine and API layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from .files import ModelFiles
from .late_chunking import chunk_spans, join_chunks
from .pooling import span_means
from .tokenization import TextTokenizer, TokenizedText
from .types import ModelDescription, Output, SequenceVectors, Task


@dataclass(frozen=True)
class SessionSignature:
    """Names, ranks and dtypes of an ONNX session's inputs and outputs."""

    inputs: dict[str, list[Any]]  # name -> shape (ints or symbolic names)
    outputs: dict[str, list[Any]]
    output_types: dict[str, str]


@dataclass(frozen=True)
class RowRequest:
    """What one row of a batch needs: its real length, outputs and chunk spans."""

    length: int
    outputs: frozenset[Output]
    dimensions: int = 0  # Matryoshka size; 0 = full
    spans: list[tuple[int, int]] | None = None  # late chunking


class EmbeddingModel(ABC):
    """A loaded model: tokenizer, description and the family's math."""

    family: str

    def __init__(self, name: str, files: ModelFiles, signature: SessionSignature) -> None:
        self.name = name
        self.files = files
        self.signature = signature
        self._configure()
        self.tokenizer: TextTokenizer = self._load_tokenizer()
        self.description: ModelDescription = self._describe()

    # --- what a family defines -------------------------------------------------

    def _configure(self) -> None:
        """Read the family's config files and check the session signature."""
        return None

    @abstractmethod
    def _load_tokenizer(self) -> TextTokenizer: ...

    @abstractmethod
    def _describe(self) -> ModelDescription: ...

    @abstractmethod
    def feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray, task: Task) -> dict[str, np.ndarray]:
        """ONNX inputs for a padded batch (int64 [B,T] ids and mask)."""

    @property
    @abstractmethod
    def output_names(self) -> list[str]:
        """The session outputs to fetch, by name."""

    @abstractmethod
    def postprocess(
        self,
        outputs: dict[str, np.ndarray],
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        rows: list[RowRequest],
    ) -> list[SequenceVectors]:
        """Per-row vectors from the session outputs of one batch."""

    # --- shared behaviour, overridable ------------------------------------------

    def prefix(self, task: Task) -> str:
        """The instruction text put before every input of this task."""
        return ""

    def batch_key(self, task: Task) -> int:
        """Requests with equal keys may share a session run (jina-v3: one task per run)."""
        return 0

    @property
    def supports_late_chunking(self) -> bool:
        return True

    @property
    def normalizes(self) -> bool:
        """Whether full-size dense vectors are L2-normalized (a Normalize module, for ST)."""
        return True

    def check_task(self, task: Task) -> None:
        """Models without tasks accept any task; families with tasks refuse unknown ones."""
        return None

    def tokenize(self, texts: list[str], task: Task, truncate: bool) -> list[TokenizedText]:
        """Each input as the model sees it: task prefix and special tokens included."""
        prefix = self.prefix(task)
        return self.tokenizer.encode([prefix + text for text in texts], truncate=truncate)

    def tokenize_document(self, chunks: list[str], task: Task) -> tuple[TokenizedText, list[tuple[int, int]]]:
        """Late chunking: the joined document and the token span of each chunk."""
        text, ends = join_chunks(self.prefix(task), chunks)
        document = self.tokenizer.encode_document(text)
        if len(document.ids) > self.tokenizer.max_tokens:
            raise InvalidArgument(
                f"inputs: late chunking needs the whole document in one window; it has "
                f"{len(document.ids)} tokens and the model's maximum is {self.tokenizer.max_tokens}",
                field="inputs",
                reason="DOCUMENT_TOO_LONG",
            )
        return document, chunk_spans(document, ends)

    def token_states(self, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """[B,T,H] float32 token states, for late chunking; None if the graph has none."""
        return None


def signature_of(session: Any) -> SessionSignature:
    """Read a session's input/output names and shapes (models.md: check at load)."""
    return SessionSignature(
        inputs={i.name: list(i.shape) for i in session.get_inputs()},
        outputs={o.name: list(o.shape) for o in session.get_outputs()},
        output_types={o.name: o.type for o in session.get_outputs()},
    )


def pooled_or_chunked(
    states: np.ndarray, pooled: np.ndarray, rows: list[RowRequest]
) -> list[SequenceVectors]:
    """Each row's dense vectors: its chunks' mean states when late-chunked, else its pooled row."""
    return [
        SequenceVectors(dense=span_means(states[b], row.spans) if row.spans else pooled[b : b + 1])
        for b, row in enumerate(rows)
    ]


def as_float32(array: np.ndarray) -> np.ndarray:
    """Pool in float32 even when the graph outputs float16 (models.md)."""
    return array if array.dtype == np.float32 else array.astype(np.float32)
