"""A float model calibrated once and quantized with any per-layer bit plan (no re-calibration).

Used by :mod:`onnxq.mixed.sensitivity` (one quantization per candidate width) and for sweeps over
mixed-precision budgets: the activation ranges do not depend on the weight widths, so they are
calibrated once and only the weight passes run per plan. Round-to-nearest weights (bias correction
when configured); reconstruction, tuning, validation and the report of :func:`onnxq.api.quantize`
are not run here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import onnx
import onnx_graphsurgeon as gs

from onnxq.config import Config, QuantConfig, as_config
from onnxq.core import graph as g
from onnxq.core.context import QuantContext
from onnxq.data.calibset import CalibrationSet
from onnxq.pipeline.build import build_pipeline, prepare_float
from onnxq.targets.profiles import resolve_config

if TYPE_CHECKING:
    from onnxq.recon.adaquant import AdaQuantConfig


@dataclass
class CalibratedModel:
    """A float model whose activations were calibrated once; quantize it with any bit plan.

    ``build`` runs the float, plan and calibrate stages of the pipeline (the expensive,
    data-dependent part of a run); ``quantize_graph(plan)`` then runs the plan and weights stages
    on a fresh copy with the calibrated activations. Round-to-nearest only: the rounding and
    tuning stages are not run here.
    """

    original: onnx.ModelProto
    reference: onnx.ModelProto
    ctx: QuantContext
    graph: gs.Graph
    calib: CalibrationSet

    @classmethod
    def build(cls, original: onnx.ModelProto, config: Config | QuantConfig, calib: CalibrationSet
              ) -> CalibratedModel:
        config = resolve_config(as_config(config))
        reference, ctx = prepare_float(original, config, calib)
        ctx.reference = reference
        graph = g.to_graph(reference)
        build_pipeline(config, first="plan", last="calibrate").run(graph, ctx)
        return cls(original, reference, ctx, graph, calib)

    def _context(self, bit_plan: tuple[tuple[str, int], ...]) -> QuantContext:
        cfg = self.ctx.config
        cfg = cfg.replace(weights=replace(cfg.weights, bit_plan=bit_plan))
        ctx = QuantContext(config=cfg, target=self.ctx.target, calib=self.calib, reference=self.reference)
        ctx.bn_stats = dict(self.ctx.bn_stats)
        return ctx

    def quantize_graph(self, bit_plan: tuple[tuple[str, int], ...]) -> tuple[gs.Graph, QuantContext]:
        """The reference with weights quantized by ``bit_plan`` and the calibrated activations."""
        graph = g.to_graph(self.reference)
        ctx = self._context(bit_plan)
        build_pipeline(ctx.config, first="plan", last="plan").run(graph, ctx)
        ctx.qparams.update(self.ctx.qparams)  # activations: calibrated (and aligned) once
        ctx.shared.update(self.ctx.shared)
        build_pipeline(ctx.config, first="weights", last="weights").run(graph, ctx)
        return graph, ctx

    @staticmethod
    def adaquant(graph: gs.Graph, ctx: QuantContext, settings: AdaQuantConfig) -> None:
        """AdaQuant on a graph of :meth:`quantize_graph` with the engine record ``settings`` (parallel for
        a sensitivity table: every layer from the float model's inputs)."""
        from onnxq.passes.rounding.adaquant import AdaQuantPass

        AdaQuantPass(settings)(graph, ctx)

    def quantize(self, bit_plan: tuple[tuple[str, int], ...]) -> onnx.ModelProto:
        """The exported QDQ model of ``bit_plan`` (exported as a run does; no validation or report)."""
        graph, ctx = self.quantize_graph(bit_plan)
        return build_pipeline(ctx.config, first="export").export(graph, ctx, template=self.original)
