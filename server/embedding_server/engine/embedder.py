"""The engine's front door: validate, tokenize off the event loop, batch, return vectors.

Both APIs (gRPC directly, REST through gRPC) end up here. One Embedder holds
every loaded model and its batcher.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ..call_context import record_engine_time
from ..cpus import available_cpus
from ..errors import ModelNotFound
from ..models.base import EmbeddingModel, RowRequest
from ..models.late_chunking import DEFAULT_OVERLAP, LateChunkedDocument, chunk_vectors, document_limit
from ..models.loader import LoadedModel
from ..models.types import ModelDescription, SequenceVectors, Task
from .batcher import BatchSettings, EngineObserver, ModelBatcher
from .requests import EmbedJob, EmbedResult, TokenizedResult
from .validation import check_dimensions, check_inputs, check_late_chunking, parse_outputs, parse_task

DEFAULT_MAX_INPUTS = 2048
WARMUP_TEXT = "warm up"


@dataclass(frozen=True)
class EngineSettings:
    max_inputs: int = DEFAULT_MAX_INPUTS
    batch: BatchSettings = field(default_factory=BatchSettings)
    tokenizer_threads: int = max(1, min(4, available_cpus()))
    late_chunking_overlap: int = DEFAULT_OVERLAP  # tokens; a window uses min(this, its capacity // 2)
    max_document_tokens: int = 0  # longest late-chunked document; 0: 16 windows of each model


class Embedder:
    """Every served model, by name, with its batcher."""

    def __init__(
        self, models: list[LoadedModel], settings: EngineSettings, observer: EngineObserver | None = None
    ) -> None:
        if not models:
            raise ValueError("at least one model is needed")
        self.settings = settings
        self.default_model = models[0].model.name
        self.observer = observer
        self._models: dict[str, EmbeddingModel] = {m.model.name: m.model for m in models}
        self._descriptions = {
            name: replace(
                model.description,
                max_document_tokens=document_limit(model.description.max_tokens, settings.max_document_tokens)
                if model.supports_late_chunking
                else 0,
            )
            for name, model in self._models.items()
        }
        self._batchers = {m.model.name: ModelBatcher(m, settings.batch, observer) for m in models}
        self._tokenize_threads = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")

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

    # --- queries ---------------------------------------------------------------------

    def descriptions(self) -> list[ModelDescription]:
        return list(self._descriptions.values())

    def model(self, name: str) -> EmbeddingModel:
        """The model for a request's ``model`` field ("" = the default)."""
        model = self._models.get(name or self.default_model)
        if model is None:
            raise ModelNotFound(
                f"model: {name!r} is not served here (models: {', '.join(self._models)})",
                field="model",
                reason="UNKNOWN_MODEL",
            )
        return model

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

        loop = asyncio.get_running_loop()
        if job.late_chunking:  # the document's windows run as independent sequences
            document = await loop.run_in_executor(
                self._tokenize_threads,
                model.tokenize_document,
                job.inputs,
                task,
                self._descriptions[model.name].max_document_tokens,
                self.settings.late_chunking_overlap,
            )
            sequences = [
                (window.ids, replace(row, length=len(window.ids), token_states=window.keep))
                for window in document.windows
            ]
            prompt_tokens = document.tokens  # the document's tokens, not the windows' repeated overlap
        else:
            encoded = await loop.run_in_executor(
                self._tokenize_threads, model.tokenize, job.inputs, task, job.truncate
            )
            sequences = [(text.ids, replace(row, length=len(text.ids))) for text in encoded]
            prompt_tokens = sum(len(ids) for ids, _ in sequences)

        vectors, timings = await self._batchers[model.name].embed_timed(sequences, task, job.deadline)
        record_engine_time(timings.queue_seconds, timings.inference_seconds)  # the call's trailers
        if self.observer is not None:
            self.observer.on_request(model.name, timings.queue_seconds, timings.inference_seconds)
        if job.late_chunking:
            vectors = await self._pool_chunks(document, vectors, job.dimensions)
        return EmbedResult(
            model=model.name,
            outputs=outputs,
            vectors=vectors,
            prompt_tokens=prompt_tokens,
            task=task,
            timings=timings,
        )

    async def _pool_chunks(
        self, document: LateChunkedDocument, windows: list[SequenceVectors], dimensions: int
    ) -> list[SequenceVectors]:
        """Stitch a document's window states and pool its chunks (off the event loop: H can be large)."""
        states = [window.token_states for window in windows]
        dense = await asyncio.get_running_loop().run_in_executor(
            self._tokenize_threads, chunk_vectors, document, states, dimensions
        )
        return [SequenceVectors(dense=chunk[None, :]) for chunk in dense]

    async def tokenize(self, model_name: str, inputs: list[str], task_value: int) -> list[TokenizedResult]:
        model = self.model(model_name)
        if len(inputs) > self.settings.max_inputs:
            check_inputs(inputs, self.settings.max_inputs)
        task = parse_task(task_value, model)
        prefix = model.prefix(task)
        loop = asyncio.get_running_loop()
        encodings = await loop.run_in_executor(
            self._tokenize_threads, model.tokenizer.encode_untruncated, [prefix + text for text in inputs]
        )
        return [TokenizedResult(ids=list(e.ids), tokens=list(e.tokens)) for e in encodings]
