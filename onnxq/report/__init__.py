"""Validation in onnxruntime, fidelity metrics, and the files written beside a model."""
