"""What the REST handlers call: the engine in this process, or a remote gRPC server.

Both backends take and give the contract's messages (``EmbedRequest`` in,
``EmbedResponse`` out), so the JSON translation, the error mapping
(``google.rpc.Status`` → OpenAI error, rest/errors.py) and the timing headers
are the same code either way:

- ``LocalBackend`` (rest/local.py, in ``embedding-server``) hands the request to the
  servicer's own embed step: no socket, no second serialization, no second
  auth check or metrics count. The HTTP client's connection is its
  fair-share flow directly, with nothing to trust from a header.
- ``Upstream`` (rest/upstream.py, ``embedding-rest``) makes the gRPC call.

The REST layer (rest/app.py) has already checked the key and opened the
call's ``CallContext`` (request id, engine time) when a backend is called.
This module is only the interface, so ``embedding-rest`` imports no engine code.
"""

from __future__ import annotations

from typing import Protocol

from embedding_client.proto import embedding_pb2 as pb


class Backend(Protocol):
    """Embed, ListModels and readiness, whatever carries them; failures raise RestError."""

    async def embed(
        self,
        request: pb.EmbedRequest,
        authorization: str | None,
        output_fields: list[str],
        request_id: str | None = None,
        flow: str | None = None,
    ) -> tuple[pb.EmbedResponse, dict[str, str]]:
        """The reply and the headers to send with it (request id, queue/inference/total time).

        ``output_fields[i]``: the REST field that asked for ``outputs[i]`` (named in errors);
        ``flow``: the HTTP client's address, its fair share of batch work.
        """
        ...

    async def list_models(self, authorization: str | None) -> pb.ListModelsResponse: ...

    async def serving(self) -> bool:
        """Whether /health says 200."""
        ...

    async def close(self) -> None: ...
