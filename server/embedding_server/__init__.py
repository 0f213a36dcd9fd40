"""embedding-service: a gRPC embedding server over ONNX Runtime CPU sessions."""

__version__ = "0.1.0"
