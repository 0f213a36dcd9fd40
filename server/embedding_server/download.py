"""``embedding-download``: fetch a jina-v3 or bge-m3 model directory from the Hugging Face hub.

    pip install './server[download]'     # in the checkout: embedding-server's download extra
    embedding-download jina-v3 models/jina-v3
    embedding-server --model jina-v3=models/jina-v3

Only the files the server reads are fetched (the ONNX graph, its external
weights, tokenizer and configs, bge-m3's heads), not the PyTorch weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .cache_dir import default_cache_dir
from .errors import ModelLoadError

if TYPE_CHECKING:  # embedding-download itself stays light: no onnxruntime, no numpy
    from .models.loader import ModelSpec

log = logging.getLogger("embedding_server")


@dataclass(frozen=True)
class Preset:
    repo_id: str
    files: tuple[str, ...]


PRESETS: dict[str, Preset] = {
    "jina-v3": Preset(
        "jinaai/jina-embeddings-v3",
        (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "onnx/model.onnx",
            "onnx/model.onnx_data",
        ),
    ),
    "bge-m3": Preset(
        "BAAI/bge-m3",
        (
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "sparse_linear.pt",
            "colbert_linear.pt",
            "onnx/model.onnx",
            "onnx/model.onnx_data",
            "onnx/Constant_7_attr__value",
        ),
    ),
}

Downloader = Callable[..., str]

#: How to get huggingface_hub: embedding-server's download extra (installed from a checkout until published).
DOWNLOAD_EXTRA = "pip install './server[download]' in the checkout (embedding-server's download extra)"
DESCRIPTION = """Fetch a jina-v3 or bge-m3 model directory from the Hugging Face hub: only the
files the server reads (the ONNX graph, its external weights, tokenizer and
configs, bge-m3's heads), not the PyTorch weights."""
EPILOG = f"""example:
  embedding-download jina-v3 models/jina-v3
  embedding-server --model jina-v3=models/jina-v3

needs huggingface_hub: {DOWNLOAD_EXTRA}"""


def download(
    name: str, destination: Path, revision: str | None = None, snapshot: Downloader | None = None
) -> Path:
    """Fetch preset ``name`` into ``destination``; returns the directory to pass to --model."""
    preset = PRESETS[name]
    if snapshot is None:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download
    snapshot(
        repo_id=preset.repo_id,
        revision=revision,
        local_dir=str(destination),
        allow_patterns=list(preset.files),
    )
    missing = missing_files(destination, preset.files)
    if missing:
        raise FileNotFoundError(f"{preset.repo_id}: the download lacks {', '.join(missing)}")
    return destination


#: A sentence-transformers repository: the graph in either layout, the tokenizer and the configs the
#: loader reads (absent ones keep their defaults), and bge-m3's heads should a fork hold them.
GENERIC_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling/config.json",
    "sparse_linear.pt",
    "colbert_linear.pt",
    "model.onnx",
    "model.onnx_data",
    "onnx/model.onnx",
    "onnx/model.onnx_data",
)
GENERIC_NEEDS = "tokenizer.json, config.json and model.onnx or onnx/model.onnx"
#: Written last into a hub model's cache directory: its files are complete, so later starts need no hub.
COMPLETE_MARK = ".embedding-service-complete.json"


def hub_preset(repo_id: str) -> Preset | None:
    """The preset of a repository whose files are known (jina-v3, bge-m3), else None."""
    return next((p for p in PRESETS.values() if p.repo_id.lower() == repo_id.lower()), None)


def hub_cache_path(cache_dir: Path, repo_id: str, revision: str | None) -> Path:
    """``CACHE/hub/ORG--REPO/REVISION`` (``main`` when not pinned)."""
    return cache_dir / "hub" / repo_id.replace("/", "--") / (revision or "main").replace("/", "--")


def fetch_hub_model(
    repo_id: str,
    revision: str | None,
    cache_dir: Path,
    snapshot: Downloader | None = None,
    label: str = "",
) -> Path:
    """The local directory of ``hf:repo_id@revision``, fetched into the cache on first use.

    Only the files the family needs are fetched (a known repository's preset, else the
    sentence-transformers set); huggingface_hub shows each file's progress. A directory marked
    complete is reused without asking the hub, so a second start works offline (an unpinned
    repository stays at what was fetched first: pin ``@REVISION`` or delete the directory to
    update). Any failure is one ModelLoadError line: ``label`` (e.g. ``--model NAME=hf:...``),
    what went wrong, and what the family needs.
    """
    preset = hub_preset(repo_id)
    patterns = preset.files if preset else GENERIC_FILES
    needs = ", ".join(preset.files) if preset else GENERIC_NEEDS
    label = label or f"hf:{repo_id}" + (f"@{revision}" if revision else "")
    destination = hub_cache_path(cache_dir, repo_id, revision)
    if (destination / COMPLETE_MARK).is_file():
        log.info("%s: using the copy in %s (fetched before)", label, destination)
        return destination
    if snapshot is None:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise ModelLoadError(
                f"{label}: fetching from the hub needs huggingface_hub: {DOWNLOAD_EXTRA}"
            ) from None
        snapshot = snapshot_download
    log.info(
        "%s: fetching %d files into %s (first start; needs %s)", label, len(patterns), destination, needs
    )
    started = time.monotonic()
    try:
        destination.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"{label}: cannot write {destination} ({exc.strerror or exc}); give a writable --cache-dir"
        ) from None
    try:
        snapshot(
            repo_id=repo_id, revision=revision, local_dir=str(destination), allow_patterns=list(patterns)
        )
    except Exception as exc:
        raise ModelLoadError(f"{label}: {_hub_failure(exc, revision)} (the model needs {needs})") from None
    missing = missing_files(destination, preset.files if preset else ("tokenizer.json", "config.json"))
    if not preset and not any((destination / f).is_file() for f in ("model.onnx", "onnx/model.onnx")):
        missing.append("model.onnx or onnx/model.onnx")
    if missing:
        raise ModelLoadError(f"{label}: the repository lacks {', '.join(missing)} (the model needs {needs})")
    (destination / COMPLETE_MARK).write_text(
        json.dumps({"repo_id": repo_id, "revision": revision, "files": list(patterns)}), encoding="utf-8"
    )
    log.info("%s: fetched in %.1fs", label, time.monotonic() - started)
    return destination


def fetched(spec: ModelSpec, cache_dir: Path | None, label: str) -> ModelSpec:
    """A hub spec as the directory its files were fetched into (first use) or found in (later);
    any other spec as it is. ``label``: how the caller's user wrote it, for the error line."""
    if spec.hub is None:
        return spec
    root = cache_dir or default_cache_dir()
    path = fetch_hub_model(spec.hub.repo_id, spec.hub.revision, root, label=label)
    return replace(spec, path=path)


def _hub_failure(exc: Exception, revision: str | None) -> str:
    """What a failed snapshot means to an operator, in a few words."""
    try:
        from huggingface_hub import errors
    except ImportError:  # a test's fake hub without the library: its own message
        return f"cannot fetch from the Hugging Face hub ({type(exc).__name__}: {_first_line(exc)})"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"no revision {revision!r} in the repository on the Hugging Face hub"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return "no such repository on the Hugging Face hub (a private or gated one needs HF_TOKEN)"
    if isinstance(exc, (errors.LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return "cannot reach the Hugging Face hub (no network, or HF_HUB_OFFLINE=1) and nothing is cached yet"
    return f"cannot fetch from the Hugging Face hub ({type(exc).__name__}: {_first_line(exc)})"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def missing_files(directory: Path, files: Sequence[str]) -> list[str]:
    """Those of ``files`` (relative paths) that a fetch left absent from ``directory``."""
    return [f for f in files if not (directory / f).is_file()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="embedding-download",
        description=DESCRIPTION,
        epilog=EPILOG,  # plain text for a terminal: the module docstring is reStructuredText
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", choices=sorted(PRESETS), help="which model family to fetch")
    parser.add_argument("destination", type=Path, help="directory to create (then: --model NAME=DIR)")
    parser.add_argument("--revision", default=None, help="a hub revision (tag, branch or commit) to pin")
    args = parser.parse_args(argv)
    try:
        path = download(args.model, args.destination, args.revision)
    except ImportError:
        print(f"embedding-download: needs huggingface_hub: {DOWNLOAD_EXTRA}", file=sys.stderr)
        return 1
    except Exception as exc:  # network, auth, missing files: one line for the operator
        print(f"embedding-download: error: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded {args.model} to {path}; serve it with: embedding-server --model {args.model}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
