"""Choosing the engine and precision a model is served with, by measurement (measure.py, rule.py)."""
