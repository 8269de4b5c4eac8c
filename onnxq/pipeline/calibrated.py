"""A float model calibrated once and quantized with any per-layer bit plan (no re-calibration).

Used by :mod:`onnxq.mixed.sensitivity` (one quantization per candidate width) and for sweeps over
mixed-precision budgets: the activation ranges do not depend on the weight widths, so they are
calibrated once and only the weight passes run per plan. Round-to-nearest weights (bias correction
when configured); reconstruction, tuning, validation and the report of :func:`onnxq.api.quantize`
are not run here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from onnxq.config.legacy import QuantConfig
from onnxq.core import graph as g
from onnxq.core.context import QuantContext
from onnxq.core.pass_infra import PassManager
from onnxq.data.calibset import CalibrationSet
from onnxq.passes.quant.align_scales import AlignScalesPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.correct_bias import CorrectBiasPass
from onnxq.passes.quant.insert_qdq import InsertQDQPass


@dataclass
class CalibratedModel:
    """A float model whose activations were calibrated once; quantize it with any bit plan.

    ``build`` runs the float phase, spec assignment, calibration and scale alignment (the
    expensive, data-dependent part of :func:`onnxq.api.quantize`); ``quantize_graph(plan)`` then
    runs only the weight passes (bias correction when configured, QDQ insertion) on a fresh copy.
    Round-to-nearest only: reconstruction and tuning are not run here.
    """

    original: onnx.ModelProto
    reference: onnx.ModelProto
    ctx: QuantContext
    graph: gs.Graph
    calib: CalibrationSet

    @classmethod
    def build(cls, original: onnx.ModelProto, config: QuantConfig, calib: CalibrationSet) -> CalibratedModel:
        from onnxq.api import prepare_float

        reference, ctx = prepare_float(original, config, calib)
        ctx.reference = reference
        graph = g.to_graph(reference)
        PassManager([AssignSpecsPass(), CalibratePass(), AlignScalesPass()])(graph, ctx)
        return cls(original, reference, ctx, graph, calib)

    def quantize_graph(self, bit_plan: tuple[tuple[str, int], ...], **changes: Any) -> tuple[gs.Graph, QuantContext]:
        """The reference with weights quantized by ``bit_plan`` (config ``changes`` such as
        ``bias_correction`` allowed) and the calibrated activations."""
        cfg = replace(self.ctx.config, bit_plan=bit_plan, **changes)
        graph = g.to_graph(self.reference)
        ctx = QuantContext(config=cfg, target=self.ctx.target, calib=self.calib, reference=self.reference)
        ctx.bn_stats = dict(self.ctx.bn_stats)
        AssignSpecsPass()(graph, ctx)
        ctx.qparams.update(self.ctx.qparams)  # activations: calibrated (and aligned) once
        ctx.shared.update(self.ctx.shared)
        passes = [CorrectBiasPass(source=cfg.bias_correction)] if cfg.bias_correction else []
        PassManager([*passes, InsertQDQPass()])(graph, ctx)
        return graph, ctx

    def quantize(self, bit_plan: tuple[tuple[str, int], ...], **changes: Any) -> onnx.ModelProto:
        """The exported QDQ model of ``bit_plan`` (cleaned up as :func:`onnxq.api.quantize` does;
        no validation or report)."""
        from onnxq.passes.export.cleanup import CleanupPass
        from onnxq.ternary.export import finish_two_bit_model

        graph, ctx = self.quantize_graph(bit_plan, **changes)
        CleanupPass()(graph, ctx)
        model = g.to_model(graph, template=self.original)
        finish_two_bit_model(model, ctx.report)
        return model
