"""Calibration texts: a built-in multilingual set, or the user's JSONL.

The built-in set (calibration.txt: 16 languages, code, numbers, chat, legal,
medical, very short and very long) is composed into texts of 1 to 12
sentences, so lengths run from 3 tokens to the model's maximum.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

BUILTIN_FILE = Path(__file__).with_name("calibration.txt")
DEFAULT_COUNT = 200
MAX_SENTENCES = 12


def sentences() -> list[str]:
    return [line for line in BUILTIN_FILE.read_text(encoding="utf-8").split("\n") if line]


def default_texts(count: int = DEFAULT_COUNT, seed: int = 0) -> list[str]:
    """Every built-in sentence alone, then deterministic compositions of 2..12 of them."""
    base = sentences()
    rng = random.Random(seed)
    texts = base[:count]
    while len(texts) < count:
        texts.append(" ".join(rng.sample(base, rng.randint(2, MAX_SENTENCES))))
    return texts


def read_jsonl(path: Path) -> list[str]:
    """One text per line: a JSON string, or an object with "text" (or "input"); errors name the line."""
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read calibration file ({exc})") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        if isinstance(value, dict):
            value = value.get("text", value.get("input"))
        if not isinstance(value, str) or not value:
            raise ValueError(f'{path}:{number}: expected a string or an object with a "text" string')
        texts.append(value)
    if not texts:
        raise ValueError(f"{path}: no calibration texts")
    return texts
