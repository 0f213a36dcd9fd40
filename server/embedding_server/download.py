"""``embedding-download``: fetch a jina-v3 or bge-m3 model directory from the Hugging Face hub.

    pip install 'embedding-service[download]'
    embedding-download jina-v3 models/jina-v3
    embedding-server --model jina-v3=models/jina-v3

Only the files the server reads are fetched (the ONNX graph, its external
weights, tokenizer and configs, bge-m3's heads), not the PyTorch weights.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


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

INSTALL_HINT = "pip install 'embedding-service[download]'"
DESCRIPTION = """Fetch a jina-v3 or bge-m3 model directory from the Hugging Face hub: only the
files the server reads (the ONNX graph, its external weights, tokenizer and
configs, bge-m3's heads), not the PyTorch weights."""
EPILOG = f"""example:
  embedding-download jina-v3 models/jina-v3
  embedding-server --model jina-v3=models/jina-v3

needs huggingface_hub: {INSTALL_HINT}"""


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
    missing = [f for f in preset.files if not (destination / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{preset.repo_id}: the download lacks {', '.join(missing)}")
    return destination


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
        print(
            f"embedding-download: needs huggingface_hub: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1
    except Exception as exc:  # network, auth, missing files: one line for the operator
        print(f"embedding-download: error: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded {args.model} to {path}; serve it with: embedding-server --model {args.model}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
