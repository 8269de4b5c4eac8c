"""Float-phase passes: function-preserving rewrites before any quantization decision (and DFQ's
equalization)."""
