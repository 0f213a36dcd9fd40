"""``embedding-quantize SRC_DIR DST_DIR``: an int8 model directory with its fidelity report.

SRC_DIR is any model directory the server loads, ``all-minilm-l6-v2`` (the
built-in model) or ``hf:ORG/REPO[@REVISION]`` (fetched into ``--cache-dir``
as ``embedding-server`` fetches it). The result is refused (exit status 1,
nothing written) when an output misses the floor, unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..download import fetched
from ..errors import ModelLoadError
from ..models.loader import ModelSpec, model_files
from .calibration import DEFAULT_COUNT, default_texts, read_jsonl
from .core import DEFAULT_SMOOTH_ALPHA, QuantizeRefused, quantize_directory
from .fidelity import Floor
from .report import REPORT_MD


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedding-quantize", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "source",
        metavar="SRC_DIR",
        help="model directory, all-minilm-l6-v2 (the built-in model) or hf:ORG/REPO[@REVISION]",
    )
    p.add_argument(
        "destination", metavar="DST_DIR", type=Path, help="where the int8 model directory is written"
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help='JSONL of texts (a string or {"text": ...} per line); default: the built-in multilingual set',
    )
    p.add_argument(
        "--texts",
        type=int,
        default=DEFAULT_COUNT,
        help=f"built-in calibration texts (default {DEFAULT_COUNT})",
    )
    p.add_argument(
        "--min-cosine",
        type=float,
        default=Floor.min,
        help=f"floor on every output's lowest cosine (default {Floor.min})",
    )
    p.add_argument(
        "--mean-cosine",
        type=float,
        default=Floor.mean,
        help=f"floor on every output's mean cosine (default {Floor.mean})",
    )
    p.add_argument(
        "--max-fp32",
        type=int,
        default=None,
        help="most MatMuls kept fp32 to meet the floor (default: a quarter of them)",
    )
    p.add_argument(
        "--smooth-alpha",
        type=float,
        default=DEFAULT_SMOOTH_ALPHA,
        help=f"SmoothQuant migration strength, 0 turns it off (default {DEFAULT_SMOOTH_ALPHA})",
    )
    p.add_argument("--force", action="store_true", help="write the model even below the floor")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the built-in model's fp32 graph and hub models are cached (as embedding-server's)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        label = f"embedding-quantize {args.source}"
        spec = fetched(ModelSpec.parse(args.source), args.cache_dir, label=label)
        files = model_files(spec, args.cache_dir)
        texts = read_jsonl(args.calibration) if args.calibration else default_texts(args.texts)
        source = str(args.calibration) if args.calibration else "built-in calibration set"
        quantize_directory(
            spec.name,
            files,
            args.destination,
            texts,
            source,
            Floor(args.min_cosine, args.mean_cosine),
            args.max_fp32,
            args.force,
            args.smooth_alpha,
            log=lambda line: print(line, file=sys.stderr),
        )
    except (QuantizeRefused, ModelLoadError, ValueError) as exc:
        print(f"embedding-quantize: {exc}", file=sys.stderr)
        return 1
    print((args.destination / REPORT_MD).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
