"""Quantization passes: decide the grids, calibrate, align scales, correct biases, write Q/DQ."""
