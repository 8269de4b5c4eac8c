"""Ternary and 2-bit weights: the ternary operators, their containers in ONNX, and the check of written codes."""
