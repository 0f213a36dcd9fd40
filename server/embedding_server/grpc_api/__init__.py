"""The gRPC API: embedding.v1.EmbeddingService, health and reflection."""
