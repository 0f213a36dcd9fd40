"""Tokenization with ``tokenizers``, under the server's rules, not the file's.

A tokenizer.json carries its own padding and truncation settings, and they
cannot be trusted: the MiniLM file pads every input to 128 and truncates at
128 (7x slower and wrong on long texts). Both are switched off here; the
batcher pads each batch to its longest sequence with the model's pad id, and
inputs are truncated only when a request asks for it.

A request's texts are encoded in one ``encode_batch_fast`` call on the
caller's thread, with the library's own thread pool off
(``TOKENIZERS_PARALLELISM=false``, set here unless the environment sets it):
only the ids are kept, and the call releases the GIL while it runs, so the
event loop or a run thread gets on meanwhile. Measured in a busy server
(bench/serving_path.py, AMD EPYC, 2 CPUs), against one ``encode`` per text
holding the GIL: 20 us of CPU a text instead of 30, and 25-30% more texts/s
in-process; with the pool on, the same call cost 52 us of wall time a text
(the pool's threads fight the run threads for the two cores). Late chunking
needs the character offsets, so ``encode_document`` keeps the slow path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ..errors import ModelLoadError
from .refusals import InputTooLong

#: Pad-token spellings to look for when no config names the pad token.
PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<|endoftext|>")

#: Read by the tokenizers library at every batch call: its own pool off, the caller's thread does it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class TokenizedText:
    """One input as the model sees it."""

    ids: np.ndarray  # int64 [n], special tokens and task prefix included
    offsets: list[tuple[int, int]]  # character span of each token in the encoded text
    special: np.ndarray  # bool [n], True for special tokens (<s>, </s>, [CLS], ...)


class TextTokenizer:
    """Encodes texts for one model: no padding, truncation only on request."""

    def __init__(self, path: Path, max_tokens: int, pad_token: str | None = None) -> None:
        try:
            self._exact = Tokenizer.from_file(str(path))
            self._truncating = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        self.max_tokens = max_tokens
        self._exact.no_padding()
        self._exact.no_truncation()
        self._truncating.no_padding()
        # tokenizers counts the special tokens its post-processor adds, so the
        # cut keeps <s> ... </s> and the total stays within max_tokens.
        self._truncating.enable_truncation(max_length=max_tokens)
        self.pad_id = self._find_pad_id(pad_token, path)

    def _find_pad_id(self, pad_token: str | None, path: Path) -> int:
        padding = Tokenizer.from_file(str(path)).padding
        candidates = [pad_token] if pad_token else []
        if padding and padding.get("pad_token"):
            candidates.append(padding["pad_token"])
        candidates.extend(PAD_TOKENS)
        for token in candidates:
            token_id = self._exact.token_to_id(token) if token else None
            if token_id is not None:
                return token_id
        if padding and padding.get("pad_id") is not None:
            return int(padding["pad_id"])
        return 0

    def token_id(self, token: str) -> int | None:
        """The id of a token string, None when the vocabulary lacks it."""
        return self._exact.token_to_id(token)

    def encode(self, texts: list[str], truncate: bool = False) -> list[np.ndarray]:
        """Each text's token ids (int64, special tokens added); too long without ``truncate`` is an
        error (InputTooLong, naming the first)."""
        tokenizer = self._truncating if truncate else self._exact
        encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=True)
        ids = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        if not truncate:
            for index, row in enumerate(ids):
                if row.shape[0] > self.max_tokens:
                    raise InputTooLong(index, int(row.shape[0]), self.max_tokens)
        return ids

    def encode_document(self, text: str) -> TokenizedText:
        """One text, never cut (late chunking checks the length itself)."""
        return _to_tokenized(self._exact.encode(text, add_special_tokens=True))

    def encode_untruncated(self, texts: list[str]) -> list[Encoding]:
        """Raw encodings with token strings, for the Tokenize RPC (never cut, never refused)."""
        return self._exact.encode_batch(texts, add_special_tokens=True)


def _to_tokenized(encoding: Encoding) -> TokenizedText:
    return TokenizedText(
        ids=np.asarray(encoding.ids, dtype=np.int64),
        offsets=list(encoding.offsets),
        special=np.asarray(encoding.special_tokens_mask, dtype=bool),
    )
