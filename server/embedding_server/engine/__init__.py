"""The hot path: queue → batch → session → pooling, shared by every API."""
