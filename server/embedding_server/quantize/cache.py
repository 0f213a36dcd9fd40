"""``--quantize int8``: an int8 copy of a model, made at load and cached on disk.

The cache entry is ``<cache-dir>/int8/<name>-<hash of the source graph and
weights>-v<format>[-u8]/`` (``-u8``: uint8 weights, on a machine whose int8
kernel saturates signed ones; see rewrite.py), a complete model directory with its fidelity report; the next
start finds it and loads in seconds. A model that is int8 already is served
as it is. A read-only cache directory falls back to a temporary one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx

from ..cache_dir import default_cache_dir, writable_cache
from ..errors import ModelLoadError
from ..models.files import ModelFiles, locate
from .calibration import default_texts
from .core import QuantizeRefused, quantize_directory, source_digest
from .report import REPORT_JSON
from .rewrite import has_signed_weights, signed_weights_exact

log = logging.getLogger("embedding_server.quantize")
CACHE_VERSION = "1"


def int8_files(name: str, files: ModelFiles, cache_dir: Path | None = None) -> ModelFiles:
    """The int8 model for ``files``: from the cache, or quantized now (ModelLoadError below the floor)."""
    if (files.root / REPORT_JSON).is_file():  # already int8
        graph = onnx.load(str(files.onnx), load_external_data=False)
        if has_signed_weights(graph) and not signed_weights_exact():
            log.warning(
                "model %s: its int8 weights are signed, and this CPU's int8 kernel saturates them "
                "(no VNNI): vectors are off their fidelity report; quantize it again on this machine",
                name,
            )
        return files
    # A machine whose int8 kernel saturates signed weights gets (and caches) the unsigned form.
    form = "" if signed_weights_exact() else "-u8"
    key = f"{name}-{source_digest(files)}-v{CACHE_VERSION}{form}"
    cached = (cache_dir or default_cache_dir()) / "int8" / key
    if (cached / REPORT_JSON).is_file():
        log.info("model %s: int8 from the cache %s", name, cached)
        return locate(cached)
    directory = writable_cache(cache_dir, "int8") / key
    started = time.monotonic()
    log.info("model %s: quantizing to int8 (checked against fp32 on the built-in calibration set)", name)
    try:
        report = quantize_directory(
            name,
            files,
            directory,
            default_texts(),
            "built-in calibration set",
            log=lambda line: log.info("%s: %s", name, line),
        )
    except QuantizeRefused as exc:
        raise ModelLoadError(f"--quantize int8: {exc}") from exc
    log.info(
        "model %s: int8 in %.1fs, worst output %s min cosine %.5f, %d MatMuls kept fp32, cached at %s",
        name,
        time.monotonic() - started,
        report["worst"]["output"],
        report["worst"]["min"],
        len(report["kept_fp32"]),
        directory,
    )
    return locate(directory)
