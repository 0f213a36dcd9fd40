"""embedding-service: a gRPC embedding server over ONNX Runtime or OpenVINO on CPUs."""

__version__ = "0.1.0"
