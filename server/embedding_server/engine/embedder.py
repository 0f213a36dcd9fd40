"""The engine's front door: validate, admit, tokenize off the event loop, batch, return vectors.

Both APIs (gRPC directly, REST through gRPC) end up here. One Embedder holds
every loaded model and its batcher.

A request is admitted (its count, and its tokens bounded from its length in
characters) before it is tokenized, so an overloaded server refuses work
without tokenizing it; the bound is settled to the real count after.
A small request (``INLINE_TOKENIZE_CHARS``) is tokenized on the event loop:
a thread hop costs more CPU than the work. Larger interactive requests
tokenize on their own threads, so a corpus job's tokenizing never delays a
query; larger batch requests tokenize on niced threads, at most
``TOKENIZER_BACKLOG`` per thread at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from ..cpus import ThreadBudget
from ..errors import ModelNotFound
from ..models.base import EmbeddingModel, RowRequest
from ..models.late_chunking import LateChunkedDocument, document_limit
from ..models.loaded import LoadedModel
from ..models.types import ModelDescription, Output, Priority, SequenceVectors, Task
from .admission import Admission
from .batcher import ModelBatcher, lower_thread_priority
from .finish import finish_document
from .jobs import EmbedJob, EmbedResult, TokenizedResult
from .observer import EngineObserver
from .tuning import BatchSettings, EngineSettings
from .validation import (
    check_dimensions,
    check_inputs,
    check_late_chunking,
    model_refusals,
    parse_outputs,
    parse_task,
)

WARMUP_TEXT = "warm up"
#: Batch requests being tokenized or waiting for a tokenizer thread, per thread.
TOKENIZER_BACKLOG = 2
#: A request of at most this many characters (either class) is tokenized on the event loop: a thread
#: hop costs 100-135 us of CPU even on an idle loop, more than the built-in WordPiece tokenizer takes
#: for 256 characters (~96 us; ~370 us at 1024), so inline is always the cheaper in CPU, and a
#: request of this size holds the loop for well under a millisecond.
INLINE_TOKENIZE_CHARS = 1024
#: Tokens an input may have beyond its characters: special tokens ([CLS], [SEP]) and their like.
SPECIAL_TOKENS = 4


@dataclass
class Tokenized:
    """A request as the batcher takes it: its sequences, and for late chunking the document."""

    sequences: list[tuple[np.ndarray, RowRequest]]
    prompt_tokens: int  # the document's tokens for late chunking, not the windows' repeated overlap
    document: LateChunkedDocument | None = None


class Embedder:
    """Every served model, by name, with its batcher.

    A loaded model may be served under several names (``--model-alias``, or
    two ``--model`` of one source): one model, one set of sessions and one
    batcher, keyed by the model's own name; ``aliases`` maps the other names
    to it. A response names the model as the request did.
    """

    def __init__(
        self,
        models: list[LoadedModel],
        settings: EngineSettings,
        observer: EngineObserver | None = None,
        batch_settings: dict[str, BatchSettings] | None = None,
        aliases: dict[str, str] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``batch_settings``: per model name, overriding ``settings.batch`` (memory budgets differ);
        ``aliases``: another served name → a loaded model's name; ``on_failure(error)``: when a
        model's dispatcher fails (the server turns NOT_SERVING)."""
        if not models:
            raise ValueError("at least one model is needed")
        self.settings = settings
        self.default_model = models[0].model.name
        self.observer = observer
        self._models: dict[str, EmbeddingModel] = {m.model.name: m.model for m in models}
        for alias, target in (aliases or {}).items():
            if alias in self._models or target not in self._models:
                raise ValueError(
                    f"alias {alias!r} -> {target!r}: the name is taken or the model is not loaded"
                )
        #: every served name, in the order ListModels shows them: each model, then its aliases
        self._model_of: dict[str, str] = {}
        for name in self._models:
            self._model_of[name] = name
            self._model_of.update({a: t for a, t in (aliases or {}).items() if t == name})
        self._descriptions = {
            name: replace(
                model.description,
                max_document_tokens=document_limit(model.description.max_tokens, settings.max_document_tokens)
                if model.supports_late_chunking
                else 0,
            )
            for name, model in self._models.items()
        }
        per_model = batch_settings or {}
        self._batchers = {
            m.model.name: ModelBatcher(
                m, per_model.get(m.model.name, settings.batch), observer, settings.threads, on_failure
            )
            for m in models
        }
        tokenizer_threads = (settings.threads or ThreadBudget.plan()).tokenizer_threads
        self._tokenize_threads = ThreadPoolExecutor(  # batch requests' tokenizing yields to queries'
            tokenizer_threads, thread_name_prefix="tokenize", initializer=lower_thread_priority
        )
        self._interactive_tokenize_threads = ThreadPoolExecutor(
            tokenizer_threads, thread_name_prefix="tokenize-interactive"
        )
        self._tokenizer_backlog = asyncio.Semaphore(TOKENIZER_BACKLOG * tokenizer_threads)

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the batchers and run every model once per task (warm-up) before serving."""
        for batcher in self._batchers.values():
            batcher.start()
        for name, model in self._models.items():
            tasks = model.description.tasks or (Task.UNSPECIFIED,)
            for task in tasks:
                await self.embed(EmbedJob(inputs=[WARMUP_TEXT], model=name, task=int(task)))

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self._batchers.values()))
        self._tokenize_threads.shutdown(wait=False, cancel_futures=True)
        self._interactive_tokenize_threads.shutdown(wait=False, cancel_futures=True)

    # --- queries ---------------------------------------------------------------------

    def descriptions(self) -> list[ModelDescription]:
        """One per served name (an alias is listed as a model of its own, under its name)."""
        return [replace(self._descriptions[model], name=name) for name, model in self._model_of.items()]

    def served_name(self, name: str) -> str:
        """The served name a request's ``model`` field means ("" = the default model's name)."""
        return name or self.default_model

    def model(self, name: str) -> EmbeddingModel:
        """The model for a request's ``model`` field ("" = the default), by any of its served names."""
        model = self._model_of.get(self.served_name(name))
        if model is None:
            raise ModelNotFound(
                f"model: {name!r} is not served here (models: {', '.join(self._model_of)})",
                field="model",
                reason="UNKNOWN_MODEL",
            )
        return self._models[model]

    def batcher(self, name: str) -> ModelBatcher:
        return self._batchers[self.model(name).name]

    @property
    def batchers(self) -> dict[str, ModelBatcher]:
        return dict(self._batchers)

    # --- the work ----------------------------------------------------------------------

    async def embed(self, job: EmbedJob) -> EmbedResult:
        model = self.model(job.model)
        check_inputs(job.inputs, self.settings.max_inputs, job.late_chunking)
        task = parse_task(job.task, model)
        outputs = parse_outputs(job.outputs, model.description)
        check_dimensions(job.dimensions, model.description)
        check_late_chunking(job, model, outputs)
        row = RowRequest(length=0, outputs=frozenset(outputs), dimensions=job.dimensions)
        priority = Priority.BATCH if job.priority == Priority.BATCH else Priority.INTERACTIVE

        batcher = self._batchers[model.name]
        admission = batcher.admission.admit(priority)
        try:
            tokenize_start = time.monotonic()
            tokenized = await self._tokenized(job, model, task, row, admission)
            tokenize_end = time.monotonic()
            vectors, timings = await batcher.embed(
                tokenized.sequences,
                task,
                job.deadline,
                admission,
                flow=job.flow,
                tokenized=(tokenize_start, tokenize_end),
            )
        finally:
            admission.release()
        if self.observer is not None:
            self.observer.on_request(model.name, timings.queue_seconds, timings.inference_seconds, priority)
        if tokenized.document is not None:
            vectors = await self._finish_document(tokenized.document, vectors, job.dimensions, outputs)
            timings = replace(timings, finished=time.monotonic())
        return EmbedResult(
            model=self.served_name(job.model),
            outputs=outputs,
            vectors=vectors,
            prompt_tokens=tokenized.prompt_tokens,
            task=task,
            timings=timings,
        )

    async def _tokenized(
        self, job: EmbedJob, model: EmbeddingModel, task: Task, row: RowRequest, admission: Admission
    ) -> Tokenized:
        """The request's sequences (a late-chunked document's windows are independent ones).

        Batch work tokenized on a thread waits for a place in the bounded tokenizer backlog.

        Its tokens are reserved (bounded from its characters) only once it may
        be tokenized, so requests waiting for the tokenizer hold no estimate.
        """
        loop = asyncio.get_running_loop()
        inline = not job.late_chunking and sum(map(len, job.inputs)) <= INLINE_TOKENIZE_CHARS
        backlog = admission.priority != Priority.INTERACTIVE and not inline
        threads = self._tokenize_threads if backlog else self._interactive_tokenize_threads
        if backlog:
            await self._tokenizer_backlog.acquire()
        try:
            admission.reserve(_token_bound(job, model, task))
            with model_refusals(model.name):
                if job.late_chunking:
                    document = await loop.run_in_executor(
                        threads,
                        model.tokenize_document,
                        job.inputs,
                        task,
                        self._descriptions[model.name].max_document_tokens,
                        self.settings.late_chunking_overlap,
                    )
                    windows = [
                        (window.ids, replace(row, length=len(window.ids), token_states=window.keep))
                        for window in document.windows
                    ]
                    return Tokenized(windows, document.tokens, document)
                if inline:
                    encoded = model.tokenize(job.inputs, task, job.truncate)
                else:
                    encoded = await loop.run_in_executor(
                        threads, model.tokenize, job.inputs, task, job.truncate
                    )
            outputs, dimensions = row.outputs, row.dimensions
            sequences = [(ids, RowRequest(int(ids.shape[0]), outputs, dimensions)) for ids in encoded]
            return Tokenized(sequences, sum(row.length for _, row in sequences))
        finally:
            if backlog:
                self._tokenizer_backlog.release()

    async def _finish_document(
        self,
        document: LateChunkedDocument,
        windows: list[SequenceVectors],
        dimensions: int,
        outputs: tuple[Output, ...],
    ) -> list[SequenceVectors]:
        """The finish step of a late-chunked document (off the event loop: H can be large)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._tokenize_threads, finish_document, document, windows, dimensions, outputs
        )

    async def tokenize(self, model_name: str, inputs: list[str], task_value: int) -> list[TokenizedResult]:
        model = self.model(model_name)
        if len(inputs) > self.settings.max_inputs:
            check_inputs(inputs, self.settings.max_inputs)
        task = parse_task(task_value, model)
        prefix = model.prefix(task)
        loop = asyncio.get_running_loop()
        encodings = await loop.run_in_executor(
            self._interactive_tokenize_threads,
            model.tokenizer.encode_untruncated,
            [prefix + text for text in inputs],
        )
        return [TokenizedResult(ids=list(e.ids), tokens=list(e.tokens)) for e in encodings]


def _token_bound(job: EmbedJob, model: EmbeddingModel, task: Task) -> int:
    """An upper bound of the request's tokens from its characters (a token covers at least one)."""
    extra = len(model.prefix(task)) + SPECIAL_TOKENS
    if job.late_chunking:
        return sum(len(text) + extra for text in job.inputs)
    cap = model.tokenizer.max_tokens + 1  # longer inputs are cut (truncate) or refused
    return sum(min(len(text) + extra, cap) for text in job.inputs)
