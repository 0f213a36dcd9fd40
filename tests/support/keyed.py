"""The API key of the ``keyed_server`` fixture (tests/conftest.py)."""

from __future__ import annotations

KEY = "client-test-key-5d1e"
