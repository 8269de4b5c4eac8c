"""The pipeline built from a configuration, and the runs that use it (quantize, the calibrated-once
model of mixed precision, inspect)."""
