"""The StreamEmbed window's default, below both its users.

The servicer enforces it and ``settings`` shows it as ``--stream-window``'s
default; here, so reading the flags does not import the gRPC layer.
"""

from __future__ import annotations

#: Requests of one StreamEmbed call in flight at once.
DEFAULT_STREAM_WINDOW = 32
