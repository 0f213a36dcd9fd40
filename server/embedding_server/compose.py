"""Composition: from ``Settings`` to a started-ready ``Embedder``, in one place.

The server, the REST shim (through the server's embedder) and Ray's in-process
mode all build their engine here, so they get the same models, aliases,
thread plan, memory budget and batch limits. It sits above ``engine`` (not
inside it) because it reads ``Settings``, whose flags derive from the
engine's knobs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .cpus import ThreadBudget, available_cpus
from .download import fetched
from .engine.embedder import Embedder
from .engine.memory import (
    DEFAULT_MEMORY_LIMIT,
    MIB,
    MemoryBudget,
    ModelShape,
    cgroup_memory_limit,
    current_rss,
    model_shares,
    release_freed_memory,
)
from .engine.tuning import BatchSettings, EngineSettings, knob_values
from .errors import ModelLoadError, StartupError
from .metrics import Metrics
from .models.files import locate
from .models.loaded import LoadedModel
from .models.loader import BUILTIN_MODEL, ModelSpec, load, model_files
from .selection.measure import Plan, choose_candidate
from .settings import Settings

log = logging.getLogger("embedding_server")


def build_embedder(
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    served: ServedModels | None = None,
    threads: ThreadBudget | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
    host_bytes: int = 0,
) -> Embedder:
    """Load every model, plan memory and batches, log the plan: the engine, not yet started.

    Blocking (loading takes seconds); raises StartupError with a one-line reason. ``served`` and
    ``threads``: already parsed / planned by the caller (None: from ``settings``). ``host_bytes``:
    resident memory that is not the engine's (in-process: what the host held before building it;
    a Ray worker's data is not the models'), left out of the budget's baseline and, under a cgroup
    limit, out of what the engine may use.
    """
    served = served or check_models(settings)
    threads = threads or thread_budget(settings)
    try:
        models = load_models(settings, served, threads, metrics)
    except (ModelLoadError, ValueError) as exc:
        raise StartupError(str(exc)) from exc
    except StartupError:
        raise
    except Exception as exc:  # e.g. a tokenizer file the library cannot parse: still one line
        log.debug("model load failed", exc_info=True)
        raise StartupError(load_failure(exc)) from None
    release_freed_memory()  # what building or quantizing at load freed is not the models' size
    limit = memory_limit(settings, host_bytes)
    planned = batch_settings(settings, models, max(0, current_rss() - host_bytes), limit)
    log_plan(threads, limit, models, planned)
    embedder = Embedder(
        models,
        engine_settings(settings, threads),
        observer=metrics,
        batch_settings=planned,
        aliases=served.aliases,
        on_failure=on_failure,
    )
    return embedder


def thread_budget(settings: Settings) -> ThreadBudget:
    """Every thread count, from the CPUs this process may use and --sessions/--threads-per-session."""
    return ThreadBudget.plan(available_cpus(), settings.sessions, settings.threads_per_session)


def engine_settings(settings: Settings, threads: ThreadBudget | None = None) -> EngineSettings:
    """``settings.tuning`` on ``threads``, the budget the models were loaded with (None: planned)."""
    return replace(settings.tuning, threads=threads or thread_budget(settings))


#: Memory the warm-up and the first calls add to the process after loading (measured: ~40 MiB).
WARM_ALLOWANCE = 64 * MIB


def memory_limit(settings: Settings, host_bytes: int = 0) -> int:
    """The engine's own memory: --memory-limit, else the container's limit less ``host_bytes``
    (what a host process holds besides the engine), else DEFAULT_MEMORY_LIMIT."""
    if settings.memory_limit:
        return settings.memory_limit
    container = cgroup_memory_limit()
    if container is not None:
        return max(0, container - host_bytes)
    return DEFAULT_MEMORY_LIMIT


def batch_settings(
    settings: Settings, models: list[LoadedModel], baseline: int, limit: int
) -> dict[str, BatchSettings]:
    """Each model's batch limits from the memory budget ``limit``, of which the loaded models and
    what came with them take ``baseline``; StartupError when that leaves too little to run."""
    base = settings.tuning.batch
    planned = {}
    sized: dict[str, tuple[ModelShape, int]] = {}  # shape, concurrent runs (bulk + query slots)
    for loaded in models:
        model = loaded.model
        shape = ModelShape.from_config(
            model.files.config("config.json"), model.description.dimensions, loaded.sessions.attention
        )
        sized[model.name] = (shape, loaded.sessions.size * (2 if base.interactive_slot else 1))
    share = model_shares(sized)
    for loaded in models:
        model = loaded.model
        shape, runs = sized[model.name]
        budget = MemoryBudget.plan(shape, limit, baseline + WARM_ALLOWANCE, runs, share[model.name])
        if budget.run_bytes <= 0 or budget.longest_single() < 16:
            raise StartupError(
                f"--memory-limit {limit // MIB}MiB: the models alone take {baseline // MIB}MiB, "
                "too little is left to run them; raise the limit"
            )
        longest = budget.longest_single()
        if longest < model.description.max_tokens:
            log.warning(
                "model %s: within --memory-limit %dMiB a sequence may have at most %d tokens "
                "(the model takes %d); longer inputs get RESOURCE_EXHAUSTED",
                model.name,
                limit // MIB,
                longest,
                model.description.max_tokens,
            )
        planned[model.name] = replace(
            base, memory=budget, max_queue_tokens=max(1, min(base.max_queue_tokens, budget.queue_tokens))
        )
    return planned


@dataclass(frozen=True)
class ServedModels:
    """What ``--model`` and ``--model-alias`` ask for: the models to load, and the other names they get.

    Two ``--model`` of one source are one model (loaded once) under both names; the first
    name is the model's own (metrics, logs), the others are aliases like ``--model-alias``.
    """

    specs: list[ModelSpec]  # one per source, in --model order; the first is the default
    aliases: dict[str, str]  # another served name → the loaded model's name

    @classmethod
    def from_settings(cls, settings: Settings) -> ServedModels:
        """ValueError with one line naming the flag for a name used twice or an alias of nothing."""
        given = [ModelSpec.parse(text) for text in settings.models] or [ModelSpec(BUILTIN_MODEL, None)]
        specs: dict[str, ModelSpec] = {}  # by source
        names: dict[str, str] = {}  # every served name → the loaded model's name
        for spec in given:
            if spec.name in names:
                raise ValueError(f"--model: name {spec.name!r} is used twice")
            first = specs.setdefault(spec.source, spec)
            names[spec.name] = first.name
        for text in settings.model_aliases:
            alias, sep, target = text.partition("=")
            if not (sep and alias and target):
                raise ValueError(f"--model-alias {text!r}: expected ALIAS=NAME")
            if alias in names:
                raise ValueError(f"--model-alias {text}: {alias!r} is already a served name")
            if target not in names:
                raise ValueError(
                    f"--model-alias {text}: no model is served as {target!r} (served: {', '.join(names)})"
                )
            names[alias] = names[target]
        return cls(list(specs.values()), {name: model for name, model in names.items() if name != model})


def load_models(
    settings: Settings, served: ServedModels, threads: ThreadBudget, metrics: Metrics | None = None
) -> list[LoadedModel]:
    """Every model ``served`` asks for, on ``threads``' sessions."""
    loaded = []
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else None
    for spec in served.specs:
        started = time.monotonic()
        spec = fetched(spec, cache_dir, label=f"--model {spec.name}={spec.hub}")
        files = model_files(spec, cache_dir)
        plan = Plan(threads.sessions, threads.threads_per_session, settings.session_layout)
        choice = choose_candidate(
            spec.name, files, settings.engine, settings.precision, settings.fidelity_floor, plan, cache_dir
        )
        if choice.candidate.precision == "int8":
            from .quantize.cache import int8_files  # onnx and the quantizer: only when asked for

            files = int8_files(spec.name, files, cache_dir)
        loaded.append(
            load(
                spec,
                sessions=threads.sessions,
                threads=threads.threads_per_session,
                layout=settings.session_layout,
                cache_dir=cache_dir,
                files=files,
                candidate=choice.candidate,
            )
        )
        loaded[-1].sessions.add_wide(threads.wide_threads)  # lone interactive runs use every core
        description = loaded[-1].model.description
        log.info(
            "loaded model %s (%s) on %s %s in %.1fs",
            spec.name,
            loaded[-1].model.family,
            description.engine,
            description.precision,
            time.monotonic() - started,
        )
        if metrics is not None:
            metrics.model_loaded(
                spec.name, time.monotonic() - started, description.engine, description.precision
            )
    return loaded


def log_plan(
    threads: ThreadBudget, limit: int, models: list[LoadedModel], planned: dict[str, BatchSettings]
) -> None:
    """One INFO line with the threads, memory and batch limits start-up chose (JSON: its ``plan``)."""
    per_model: dict[str, dict[str, object]] = {}
    for loaded in models:
        batch = planned[loaded.model.name]
        memory = batch.memory
        per_model[loaded.model.name] = {
            "sessions": loaded.sessions.size,
            "layout": loaded.sessions.layout,
            "threads_per_session": loaded.sessions.threads,
            "wide_threads": loaded.sessions.wide_threads,  # 0: no wide session (model too big, or 1 CPU)
            "attention": loaded.sessions.attention,  # plain, fused or blocked: engine/memory.py
            **knob_values(batch),  # every batching knob, by its flag's name
            "run_memory_mib": memory.run_bytes // MIB if memory else None,
            "longest_input_tokens": memory.longest_single() if memory else None,
        }
    plan = {"threads": threads.as_dict(), "memory_limit_mib": limit // MIB, "models": per_model}
    models_text = "; ".join(
        f"model {name}: {m['sessions']} sessions ({m['layout']}) x {m['threads_per_session']} "
        f"intra-op threads, wide session {m['wide_threads'] or 'none'}, {m['attention']} attention, "
        f"batches <= {m['max_batch_tokens']} tokens / {m['max_batch_size']} sequences, "
        f"{m['run_memory_mib']} MiB a run (inputs <= {m['longest_input_tokens']} tokens), "
        f"queue <= {m['max_queue_requests']} requests / {m['max_queue_tokens']} tokens"
        for name, m in per_model.items()
    )
    log.info(
        "start-up plan: %d CPUs; per model %d interactive + %d bulk run threads and %d finish thread; "
        "tokenizer threads %d for queries + %d for batch work; memory limit %d MiB; %s",
        threads.cpus,
        threads.interactive_run_threads,
        threads.bulk_run_threads,
        threads.finish_threads,
        threads.tokenizer_threads,
        threads.tokenizer_threads,
        limit // MIB,
        models_text,
        extra={"plan": plan},
    )


def check_models(settings: Settings) -> ServedModels:
    """--model and --model-alias parsed, and the quick checks of every model directory (ONNX file,
    tokenizer): before any port opens. A hub model (``hf:``) is fetched later, once health answers."""
    try:
        served = ServedModels.from_settings(settings)
        for spec in served.specs:
            if spec.path is not None:
                locate(spec.path)
    except (ModelLoadError, ValueError) as exc:
        raise StartupError(str(exc)) from None
    return served


def load_failure(exc: Exception) -> str:
    """One line for a model that failed to load in a way the loader did not foresee."""
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"cannot load the model: {type(exc).__name__}: {first_line}"
