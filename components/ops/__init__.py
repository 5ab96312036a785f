"""Ops: MLflow tracking, the model registry and champion gate, the served pyfunc model."""
