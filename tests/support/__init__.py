"""Test helpers: real server processes, synthetic model directories, numpy references."""
