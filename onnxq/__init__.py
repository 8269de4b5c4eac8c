"""onnxq: post-training quantization of ONNX models to standard QDQ, validated in onnxruntime.

Public API::

    import onnxq
    result = onnxq.quantize("model.onnx", "calib.npz", onnxq.QuantConfig(weight_bits=8))
    result.save("model.int8.onnx")
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxq.config.legacy import QuantConfig
from onnxq.errors import UserError

__all__ = ["QuantConfig", "QuantResult", "UserError", "__version__", "quantize", "validate"]


def __getattr__(name: str):
    # Lazy: importing onnxq stays cheap (no onnxruntime/graphsurgeon until needed).
    if name in ("quantize", "QuantResult"):
        from onnxq import api

        return getattr(api, name)
    if name == "validate":
        from onnxq.report.validate import validate

        return validate
    raise AttributeError(name)
