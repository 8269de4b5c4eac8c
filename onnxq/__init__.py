"""onnxq: post-training quantization of ONNX models to standard QDQ, validated in onnxruntime.

Public API::

    import onnxq
    config = onnxq.Config.from_preset("w4a8")          # or onnxq.Config(weights=onnxq.Weights(bits=4), ...)
    result = onnxq.quantize("model.onnx", "calib.npz", config)
    result.save("model.w4a8.onnx")                     # also writes model.w4a8.report.json
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxq.config import (
    BRECQ,
    GPTQ,
    AccuracyTarget,
    Activations,
    AdaQuant,
    AdaRound,
    Calibration,
    Config,
    Engine,
    FloatPhase,
    MixedPrecision,
    MRECGMerge,
    QDrop,
    QuantConfig,
    RoundToNearest,
    Tuning,
    Validation,
    Weights,
)
from onnxq.errors import UserError

__all__ = [
    "BRECQ", "GPTQ", "AccuracyTarget", "Activations", "AdaQuant", "AdaRound", "Calibration", "Config", "Engine",
    "FloatPhase", "MRECGMerge",
    "MixedPrecision", "QDrop", "QuantConfig", "QuantResult", "RoundToNearest", "Tuning", "UserError", "Validation",
    "Weights", "__version__", "quantize", "validate",
]


def __getattr__(name: str):
    # Lazy: importing onnxq stays cheap (no onnxruntime/graphsurgeon until needed).
    if name in ("quantize", "QuantResult"):
        from onnxq import api

        return getattr(api, name)
    if name == "validate":
        from onnxq.report.validate import validate

        return validate
    raise AttributeError(name)
