"""Reconstruction blocks: cutting a QDQ graph into blocks, building each block's torch module,
caching its data, checkpoints, and the engine's resolved settings."""
