"""Model families: loading a directory, tokenizing, and turning ONNX outputs into vectors."""
