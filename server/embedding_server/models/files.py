"""Finding a model directory's files and reading its JSON configs.

Both layouts occur in the wild: ``model.onnx`` at the top, or ``onnx/model.onnx``
(the hub exports of jina-v3 and bge-m3). A missing or broken file must stop the
server at start-up with one line that names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

ONNX_CANDIDATES = ("model.onnx", "onnx/model.onnx")
#: Written by the quantizer beside an int8 graph (embedding_server.quantize.report): its precision mark.
QUANTIZATION_REPORT = "quantization_report.json"


@dataclass(frozen=True)
class ModelFiles:
    """Where one model's files are: configs and tokenizer under ``root``, the graph at ``onnx``."""

    root: Path
    onnx: Path

    def config(self, relative: str) -> dict[str, Any] | list[Any] | None:
        """Parse a JSON file under ``root``; None when it does not exist."""
        parsed: dict[str, Any] | list[Any] | None = read_json(self.root / relative)
        return parsed

    def exists(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    def path(self, relative: str) -> Path:
        return self.root / relative


def read_json(path: Path) -> Any:
    """Parse JSON, naming the file in the error when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON file ({exc})") from exc


def locate(directory: Path) -> ModelFiles:
    """The files of a model directory, or a ModelLoadError naming what is missing."""
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: model directory does not exist")
    for candidate in ONNX_CANDIDATES:
        if (directory / candidate).is_file():
            files = ModelFiles(root=directory, onnx=directory / candidate)
            break
    else:
        raise ModelLoadError(f"{directory}: no model.onnx or onnx/model.onnx")
    if not files.exists("tokenizer.json"):
        raise ModelLoadError(f"{directory / 'tokenizer.json'}: missing (the server tokenizes with it)")
    return files


def missing_external_data(onnx_path: Path) -> list[Path]:
    """External weight files that ``onnx_path`` refers to and that are absent.

    Called when ONNX Runtime refuses a graph, to turn its long message into one
    that names the missing file (``model.onnx_data``, ``Constant_7_attr__value``...).
    """
    return [path for path, _ in external_data_extents(onnx_path) if not path.is_file()]


def truncated_external_data(onnx_path: Path) -> list[tuple[Path, int, int]]:
    """External weight files shorter than the graph needs: (path, size, bytes needed).

    A cut-off download of a 2 GB ``model.onnx_data`` is common; name that file
    rather than the graph.
    """
    return [
        (path, path.stat().st_size, needed)
        for path, needed in external_data_extents(onnx_path)
        if path.is_file() and path.stat().st_size < needed
    ]


def external_data_extents(onnx_path: Path) -> list[tuple[Path, int]]:
    """Each external file the graph refers to, with the end of the last byte range it reads.

    Needs ``onnx``, a dependency of the server distribution (it builds the built-in model's
    graph). Without it (an environment trimmed by hand) nothing is found, and the caller reports
    ONNX Runtime's own first line: still one line, not an ImportError traceback.
    """
    try:
        import onnx  # imported lazily: only needed to diagnose a failed load, and by the quantizer
    except ImportError:
        return []
    try:
        graph = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # the graph itself is unreadable; the caller reports that
        return []
    tensors = list(graph.graph.initializer)
    for node in graph.graph.node:
        tensors.extend(attr.t for attr in node.attribute if attr.HasField("t"))
    ends: dict[str, int] = {}
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if "location" in entries:
            end = int(entries.get("offset") or 0) + int(entries.get("length") or 0)
            ends[entries["location"]] = max(end, ends.get(entries["location"], 0))
    return [(onnx_path.parent / location, end) for location, end in sorted(ends.items())]
