"""The interface every model family implements, and what they share.

A family turns a padded batch into ONNX feeds, and the session outputs back
into raw per-sequence vectors (its pooling and heads). Everything else
(queueing, batching, sessions, the finish step: Matryoshka, normalization,
late-chunk pooling, sign bits; the wire format) is family-agnostic and lives
in the engine (engine/finish.py) and API layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .files import ModelFiles
from .late_chunking import LateChunkedDocument, chunk_spans, join_chunks, plan_document
from .refusals import DocumentTooLong
from .tokenization import TextTokenizer
from .types import ModelDescription, Output, SequenceVectors, Task


@dataclass(frozen=True)
class SessionSignature:
    """Names, ranks and dtypes of an ONNX session's inputs and outputs."""

    inputs: dict[str, list[Any]]  # name -> shape (ints or symbolic names)
    outputs: dict[str, list[Any]]
    output_types: dict[str, str]


@dataclass(frozen=True)
class RowRequest:
    """What one row of a batch needs: its real length, its outputs, or its raw token states.

    A late-chunking window sets ``token_states`` to the rows [a, b) of its
    states that the document keeps; it comes back as those rows, unpooled,
    and the engine stitches and pools the document's windows.
    """

    length: int
    outputs: frozenset[Output]
    dimensions: int = 0  # Matryoshka size; 0 = full
    token_states: tuple[int, int] | None = None  # late chunking: return these rows' states


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
        """Per-row raw vectors from the session outputs of one batch: pooled, not truncated or
        normalized (engine/finish.py does that); a late-chunking window's kept token states."""

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

    def tokenize(self, texts: list[str], task: Task, truncate: bool) -> list[np.ndarray]:
        """Each input's token ids as the model sees it: task prefix and special tokens included."""
        prefix = self.prefix(task)
        texts = [prefix + text for text in texts] if prefix else texts
        return self.tokenizer.encode(texts, truncate=truncate)

    def tokenize_document(
        self, chunks: list[str], task: Task, max_document_tokens: int, overlap: int
    ) -> LateChunkedDocument:
        """Late chunking: the joined document as model windows, and the token span of each chunk.

        A document over ``max_document_tokens`` (special tokens included) is
        refused; ``truncate`` never applies (cutting it would drop chunks).
        """
        text, ends = join_chunks(self.prefix(task), chunks)
        document = self.tokenizer.encode_document(text)
        if len(document.ids) > max_document_tokens:
            raise DocumentTooLong(len(document.ids), max_document_tokens)
        spans = chunk_spans(document, ends)
        return plan_document(document, spans, self.tokenizer.max_tokens, overlap)

    def token_states(self, outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        """[B,T,H] float32 token states, for late chunking; None if the graph has none."""
        return None


class TokenStatesModel(EmbeddingModel):
    """A family whose graph's one output (``_output``, set by ``_configure``) is the token states:
    pooled by the family, kept whole for late chunking."""

    _output: str

    @property
    def output_names(self) -> list[str]:
        return [self._output]

    def token_states(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return as_float32(outputs[self._output])


def signature_of(session: Any) -> SessionSignature:
    """Read a session's input/output names and shapes (models.md: check at load)."""
    return SessionSignature(
        inputs={i.name: list(i.shape) for i in session.get_inputs()},
        outputs={o.name: list(o.shape) for o in session.get_outputs()},
        output_types={o.name: o.type for o in session.get_outputs()},
    )


def pooled_or_states(
    states: np.ndarray | None, pooled: np.ndarray, rows: list[RowRequest]
) -> list[SequenceVectors]:
    """Each row's pooled vector, or for a late-chunking window the token states it keeps.

    The kept rows are copied so that a window's result does not hold the whole
    padded batch output alive while the rest of its document runs.
    """
    results = []
    for b, row in enumerate(rows):
        if row.token_states is not None and states is not None:
            start, end = row.token_states
            results.append(SequenceVectors(token_states=states[b, start:end].copy()))
        else:
            results.append(SequenceVectors(dense=pooled[b : b + 1]))
    return results


def as_float32(array: np.ndarray) -> np.ndarray:
    """Pool in float32 even when the graph outputs float16 (models.md)."""
    return array if array.dtype == np.float32 else array.astype(np.float32)
