"""Tuning passes after quantization: per-channel output statistics and biases."""
