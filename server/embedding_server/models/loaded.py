"""A loaded model: what the engine runs, without the loader that makes one.

Its own module so the engine (which only runs models) does not depend on
``models.loader`` (which finds, builds and opens them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import EmbeddingModel
from .engines import RunPool


@dataclass
class LoadedModel:
    """A model and the engine's run pool that runs it."""

    model: EmbeddingModel
    sessions: RunPool
