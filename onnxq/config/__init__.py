"""The configuration of a run: typed, frozen, nested; loadable from TOML; named presets.

::

    from onnxq.config import BRECQ, Config, Weights
    config = Config(weights=Weights(bits=4, symmetric=False, range_method="mse"), rounding=BRECQ.long())

See :mod:`onnxq.config.run` (the whole), :mod:`onnxq.config.sections`, :mod:`onnxq.config.rounding`,
:mod:`onnxq.config.files` (TOML and overrides) and :mod:`onnxq.config.presets`.
"""

from onnxq.config.legacy import QuantConfig, as_config
from onnxq.config.rounding import BRECQ, GPTQ, AdaQuant, AdaRound, MRECGMerge, QDrop, Rounding, RoundToNearest
from onnxq.config.run import Config
from onnxq.config.sections import (
    AccuracyTarget,
    Activations,
    Calibration,
    Engine,
    FloatPhase,
    MixedPrecision,
    Tuning,
    Validation,
    Weights,
)

__all__ = [
    "BRECQ", "GPTQ", "AccuracyTarget", "Activations", "AdaQuant", "AdaRound", "Calibration", "Config", "Engine",
    "FloatPhase", "MRECGMerge",
    "MixedPrecision", "QDrop", "QuantConfig", "RoundToNearest", "Rounding", "Tuning", "Validation", "Weights",
    "as_config",
]
