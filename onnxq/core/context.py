"""QuantContext: the only side channel between passes.

Fields and who writes them:
    config      the run's QuantConfig (read by all).
    target      the resolved Target profile.
    calib       calibration feeds (read by CalibratePass, ReconstructPass).
    reference   the float model after the float phase (ReconstructPass's targets).
    specs       tensor name -> QuantSpec (AssignSpecsPass).
    shared      activation tensor name -> tensor whose qparams it reuses (AssignSpecsPass).
    qparams     tensor name -> QParams (CalibratePass for activations, InsertQDQPass for weights/biases).
    float_weights  weight name -> float array before quantization (InsertQDQPass; reconstruction reads it).
    float_ops   node name -> reason it stays float (AssignSpecsPass).
    bn_stats    output tensor of an op a BatchNormalization was folded into -> (beta, gamma) of that BN,
                so the tensor is ~ N(beta, gamma^2) per channel (FoldBatchNormPass; updated by
                EqualizeWeightsPass and AbsorbBiasPass, read by AbsorbBiasPass and CorrectBiasPass).
    report      JSON-able dict of everything worth telling the user.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxq.config.legacy import QuantConfig
from onnxq.core.spec import QParams, QuantSpec

log = logging.getLogger(__name__)


@dataclass
class QuantContext:
    config: QuantConfig
    target: Any = None
    calib: Any = None
    reference: Any = None
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    qparams: dict[str, QParams] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    float_ops: dict[str, str] = field(default_factory=dict)
    bn_stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=lambda: {"passes": []})

    def log_pass(self, name: str, modified: bool, seconds: float) -> None:
        log.debug("%s: modified=%s (%.2fs)", name, modified, seconds)
        self.report["passes"].append({"pass": name, "modified": modified, "seconds": round(seconds, 3)})
