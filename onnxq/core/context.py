"""QuantContext: the only side channel between passes, with a typed field for everything they hand on.

Fields and who writes them:
    config      the run's resolved :class:`~onnxq.config.Config` (read by all).
    target      the resolved :class:`~onnxq.targets.profiles.Target`.
    calib       calibration feeds (read by CalibratePass, the rounding and tuning passes).
    reference   the float model after the float phase (the rounding passes' targets).
    specs       tensor name -> QuantSpec (AssignSpecsPass).
    shared      activation tensor name -> tensor whose qparams it reuses (AssignSpecsPass).
    qparams     tensor name -> QParams (CalibratePass for activations, InsertQDQPass for weights/biases).
    float_weights  weight name -> float array before quantization (InsertQDQPass; reconstruction reads it).
    float_ops   node name -> reason it stays float (AssignSpecsPass).
    layer_hessians  Conv/Gemm/MatMul output tensor name -> E[x x^T] of its input in its weight's GEMM layout,
                (group, K, K) (CalibratePass, when the rounding method is gptq; read by
                :mod:`onnxq.targets.weight_codes`).
    bn_stats    output tensor of an op a BatchNormalization was folded into -> (beta, gamma) of that BN,
                so the tensor is ~ N(beta, gamma^2) per channel (FoldBatchNormPass; updated by
                EqualizeWeightsPass and AbsorbBiasPass, read by AbsorbBiasPass and CorrectBiasPass).
    two_bit_codes  grid ("ternary" or "int2") -> {code constant -> weight name} of the 2-bit weights
                (InsertQDQPass; read by ExportTwoBitPass, which records them in the model).
    two_bit_export grid -> what ExportTwoBitPass did ({"storage", "int2_cast_to_int8"}).
    reconstruction the last reconstruction's report (ReconstructPass, AdaQuantPass; MRECGPass reads it).
    report      JSON-able dict of everything worth telling the user (written, never read back).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnxq.core.spec import QParams, QuantSpec

if TYPE_CHECKING:  # the layers above core: typing only
    from onnxq.config import Config
    from onnxq.data.calibset import CalibrationSet
    from onnxq.targets.profiles import Target

log = logging.getLogger(__name__)


@dataclass
class QuantContext:
    config: Config
    target: Target | None = None
    calib: CalibrationSet | None = None
    reference: onnx.ModelProto | None = None
    specs: dict[str, QuantSpec] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    qparams: dict[str, QParams] = field(default_factory=dict)
    float_weights: dict[str, np.ndarray] = field(default_factory=dict)
    float_ops: dict[str, str] = field(default_factory=dict)
    layer_hessians: dict[str, np.ndarray] = field(default_factory=dict)
    bn_stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    two_bit_codes: dict[str, dict[str, str]] = field(default_factory=dict)
    two_bit_export: dict[str, dict[str, Any]] = field(default_factory=dict)
    reconstruction: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=lambda: {"passes": []})

    def log_pass(self, name: str, modified: bool, seconds: float) -> None:
        log.debug("%s: modified=%s (%.2fs)", name, modified, seconds)
        self.report["passes"].append({"pass": name, "modified": modified, "seconds": round(seconds, 3)})
