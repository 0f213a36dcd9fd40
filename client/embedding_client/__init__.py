"""Python client for embedding-service (gRPC), generated stubs in ``embedding_client.proto``."""
