"""Vector math on token states, in float32 numpy (models.md's formulas)."""

from __future__ import annotations

import numpy as np

EPSILON = 1e-12


def normalize(x: np.ndarray) -> np.ndarray:
    """L2-normalize the last axis: x / max(||x||, 1e-12)."""
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    out: np.ndarray = x / np.maximum(norms, EPSILON)
    return out


def mean_pool(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of the unmasked token states: [B,T,H], [B,T] -> [B,H]."""
    weights = mask.astype(np.float32)[..., None]
    summed = np.einsum("bth,btx->bh", states, weights) if states.shape[0] else states.sum(1)
    pooled: np.ndarray = summed / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled


def cls_pool(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The first token's state: [B,T,H] -> [B,H]."""
    first: np.ndarray = states[:, 0]
    return first


def max_pool(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-dimension max over the unmasked tokens."""
    masked = np.where(mask[..., None].astype(bool), states, -np.inf)
    pooled: np.ndarray = masked.max(axis=1)
    return pooled


def mean_sqrt_len_pool(states: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sum of the unmasked states divided by sqrt(token count) (sentence-transformers)."""
    weights = mask.astype(np.float32)[..., None]
    pooled: np.ndarray = (states * weights).sum(axis=1) / np.sqrt(np.maximum(weights.sum(axis=1), 1e-9))
    return pooled


def span_means(states: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Mean state of each [start, end) token span of one sequence: [T,H] -> [len(spans),H]."""
    return np.stack([states[start:end].mean(axis=0) for start, end in spans])
