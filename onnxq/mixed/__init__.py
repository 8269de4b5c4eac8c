"""Mixed precision: per-layer sensitivity tables and the integer program that picks each layer's width."""
