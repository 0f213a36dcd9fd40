"""The OpenAI-compatible REST shim: JSON over HTTP in front of the gRPC contract.

It holds no model logic: ``schema`` checks the body's shape, ``translate``
maps it to an ``EmbedRequest`` and the reply back, ``errors`` turns gRPC
statuses into OpenAI-shaped HTTP errors, ``app`` is the Starlette app,
``backend`` what it calls: ``local`` (the engine of this process) or
``upstream`` (a grpc.aio channel to a remote server), ``serving`` runs uvicorn on the host's loop,
``inprocess`` wires it into ``embedding-server``, ``standalone`` is
``embedding-rest``.
"""
