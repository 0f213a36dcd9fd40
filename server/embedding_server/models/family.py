"""Which model family a directory holds (contract.md, "Command line").

``config.json`` with ``lora_adaptations`` → jina-v3; ``sparse_linear.pt`` /
``colbert_linear.pt`` beside it, or ONNX outputs ``sparse_vecs`` /
``colbert_vecs`` → bge-m3; otherwise sentence-transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

from .files import ModelFiles

JINA_V3 = "jina-v3"
BGE_M3 = "bge-m3"
SENTENCE_TRANSFORMERS = "sentence-transformers"
FAMILIES = (JINA_V3, BGE_M3, SENTENCE_TRANSFORMERS)

BGE_M3_HEAD_FILES = ("sparse_linear.pt", "colbert_linear.pt")
BGE_M3_OUTPUTS = ("sparse_vecs", "colbert_vecs")


def detect_family(files: ModelFiles, onnx_output_names: Iterable[str]) -> str:
    """The family name for a model directory whose ONNX session has these outputs."""
    config = files.config("config.json")
    if isinstance(config, dict) and "lora_adaptations" in config:
        return JINA_V3
    if any(files.exists(name) for name in BGE_M3_HEAD_FILES):
        return BGE_M3
    if any(name in BGE_M3_OUTPUTS for name in onnx_output_names):
        return BGE_M3
    return SENTENCE_TRANSFORMERS
