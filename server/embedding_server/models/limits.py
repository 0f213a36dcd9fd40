"""How many tokens one input may have (models.md, "Max tokens of a model")."""

from __future__ import annotations

from .files import ModelFiles

#: A tokenizer_config ``model_max_length`` above this is transformers' "unset" sentinel.
SANE_LIMIT = 1_000_000
ROBERTA_TYPES = ("xlm-roberta", "roberta", "camembert", "bge-m3")


def position_limit(files: ModelFiles) -> int | None:
    """The position table's usable length (XLM-R reserves 2 positions for padding)."""
    config = files.config("config.json")
    if not isinstance(config, dict) or not config.get("max_position_embeddings"):
        return None
    positions = int(config["max_position_embeddings"])
    model_type = str(config.get("model_type", "")).lower()
    return positions - 2 if any(t in model_type for t in ROBERTA_TYPES) else positions


def tokenizer_limit(files: ModelFiles) -> int | None:
    config = files.config("tokenizer_config.json")
    value = config.get("model_max_length") if isinstance(config, dict) else None
    if isinstance(value, (int, float)) and 0 < value < SANE_LIMIT:
        return int(value)
    return None


def xlm_roberta_max_tokens(files: ModelFiles, fallback: int = 8192) -> int:
    """jina-v3 / bge-m3: model_max_length when sane, else max_position_embeddings - 2."""
    positions = position_limit(files)
    declared = tokenizer_limit(files)
    if declared and (positions is None or declared <= positions):
        return declared
    return positions or fallback


def sentence_transformers_max_tokens(files: ModelFiles) -> int:
    """sentence_bert_config's max_seq_length first (256 for all-MiniLM-L6-v2)."""
    config = files.config("sentence_bert_config.json")
    if isinstance(config, dict) and config.get("max_seq_length"):
        return int(config["max_seq_length"])
    positions = position_limit(files)
    declared = tokenizer_limit(files)
    candidates = [value for value in (declared, positions) if value]
    return min(candidates) if candidates else 512
