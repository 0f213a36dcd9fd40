"""Whether the server is starting, serving or draining, shared by every API."""

from __future__ import annotations

import enum

from ..engine.embedder import Embedder
from ..errors import NotServing


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


class ServingState:
    """The one Embedder, once the models are loaded and warm, and the server's phase."""

    def __init__(self) -> None:
        self.phase = Phase.STARTING
        self.embedder: Embedder | None = None

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING

    def require(self) -> Embedder:
        """The Embedder, or NotServing (UNAVAILABLE) while starting or shutting down."""
        if self.phase is Phase.STARTING or self.embedder is None:
            raise NotServing(
                "server is starting up: models are still loading; retry shortly", reason="NOT_SERVING"
            )
        if self.phase is Phase.DRAINING:
            raise NotServing("server is shutting down; retry on another replica", reason="NOT_SERVING")
        return self.embedder
