"""The pipeline as data: which passes a configuration runs, in which order, built in one place.

Stages, in order (:data:`STAGES`)::

    float      Canonicalize, FoldBatchNorm, [EqualizeWeights], [AbsorbBias]   function-preserving
    plan       AssignSpecs                                                    what gets which grid
    calibrate  Calibrate, AlignScales                                         activation ranges
    weights    [CorrectBias], InsertQDQ                                       weights, biases, Q/DQ
    rounding   Cleanup, Reconstruct | AdaQuant | MRECG                        learned rounding
    tuning     [TuneStats], [TuneBias], [GridBias]                            output statistics
    export     FitKernels, Cleanup; then, on the exported model, ExportTwoBit

``onnxq quantize`` runs them all (the float stage first, whose result is the float reference the
later stages compare against), ``onnxq inspect`` the float and plan stages, and the
mixed-precision sensitivity table the float, plan and calibrate stages once and then plan,
weights and export once per candidate plan. The rounding stage turns the configuration's
rounding method into the engine's resolved record here (:mod:`onnxq.blocks.engine_settings`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import onnx_graphsurgeon as gs

from onnxq.blocks.engine_settings import adaquant_settings, recon_settings
from onnxq.config import GPTQ, AdaQuant, AdaRound, Config, RoundToNearest
from onnxq.core import graph as g
from onnxq.core.context import QuantContext
from onnxq.core.pass_infra import ModelPass, Pass, PassManager
from onnxq.errors import UserError
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.export.clip_on_codes import ClipOnCodesPass
from onnxq.passes.export.dynamic_matmul import DynamicMatMulPass
from onnxq.passes.export.fit_kernels import FitKernelsPass
from onnxq.passes.export.keep_float import KeepFloatPass
from onnxq.passes.export.two_bit import ExportTwoBitPass
from onnxq.passes.export.widen_int4 import WidenInt4Pass
from onnxq.passes.float.absorb_bias import AbsorbBiasPass
from onnxq.passes.float.canonicalize import CanonicalizePass
from onnxq.passes.float.equalize_weights import EqualizeWeightsPass
from onnxq.passes.float.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.float.smooth_activations import SmoothActivationsPass
from onnxq.passes.quant.align_scales import AlignScalesPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.correct_bias import CorrectBiasPass
from onnxq.passes.quant.insert_qdq import InsertQDQPass

STAGES = ("float", "plan", "calibrate", "weights", "rounding", "tuning", "export")


def _float(config: Config) -> list[Pass]:
    passes: list[Pass] = [CanonicalizePass(), FoldBatchNormPass()]
    if config.float_phase.equalize:
        passes.append(EqualizeWeightsPass(relu6=config.float_phase.relu6))
    if config.float_phase.bias_absorb is not None:
        passes.append(AbsorbBiasPass(source=config.float_phase.bias_absorb))
    if config.float_phase.smooth:
        passes.append(SmoothActivationsPass(alpha=config.float_phase.smooth_alpha,
                                            activation_bits=config.activations.bits or 8,
                                            weight_bits=config.weights.bits))
    return passes


def _plan(config: Config) -> list[Pass]:
    return [AssignSpecsPass()]


def _calibrate(config: Config) -> list[Pass]:
    return [CalibratePass(), AlignScalesPass()]


def _weights(config: Config) -> list[Pass]:
    correct = config.tuning.bias_correction
    return [*([CorrectBiasPass(source=correct)] if correct is not None else []), InsertQDQPass()]


def _rounding(config: Config) -> list[Pass]:
    rounding = config.rounding
    if isinstance(rounding, RoundToNearest | GPTQ):
        return []  # InsertQDQPass rounds (onnxq.targets.weight_codes)
    engine = config.engine
    common = dict(checkpoint_dir=engine.checkpoint_dir, keep_checkpoint=engine.keep_checkpoint,
                  cache_budget_bytes=engine.cache_budget_mb << 20)
    if isinstance(rounding, AdaQuant):
        from onnxq.passes.rounding.adaquant import AdaQuantPass

        learner: Pass = AdaQuantPass(adaquant_settings(rounding, seed=config.seed, device=engine.device), **common)
    else:
        settings = recon_settings(rounding, activation_bits=config.activations.bits or 8, seed=config.seed,
                                  device=engine.device)
        merge = getattr(rounding, "mrecg", None)
        if merge is not None:
            from onnxq.passes.rounding.mrecg import MRECGPass

            merge = rounding.resolved_mrecg()
            learner = MRECGPass(settings, k=merge.k, capacity=merge.capacity, iters=merge.iters,
                                max_chain=rounding.max_chain, **common)
        else:
            from onnxq.passes.rounding.reconstruct import ReconstructPass

            learner = ReconstructPass(settings, max_chain=rounding.max_chain,
                                      layerwise=isinstance(rounding, AdaRound), **common)
    return [CleanupPass(), learner]  # unique node names first: blocks refer to nodes by name


def _tuning(config: Config) -> list[Pass]:
    passes: list[Pass] = []
    if config.tuning.stats_tuning:
        from onnxq.passes.tune.tune_stats import TuneStatsPass

        passes.append(TuneStatsPass())
    if config.tuning.bias_tuning:
        from onnxq.passes.tune.tune_bias import TuneBiasPass

        passes.append(TuneBiasPass())
    from onnxq.targets.profiles import get_target

    if get_target(config.target).bias_grid:  # last: the passes above may move scales and biases
        from onnxq.passes.quant.grid_bias import GridBiasPass

        passes.append(GridBiasPass())
    return passes


def _export(config: Config) -> list[Pass]:
    return [FitKernelsPass(), ClipOnCodesPass(), KeepFloatPass(), DynamicMatMulPass(), CleanupPass()]


_BUILDERS: dict[str, Callable[[Config], list[Pass]]] = {
    "float": _float, "plan": _plan, "calibrate": _calibrate, "weights": _weights, "rounding": _rounding,
    "tuning": _tuning, "export": _export,
}


@dataclass
class Pipeline:
    """Graph passes, then (when the export stage is included) the passes over the exported model."""

    graph_passes: PassManager
    model_passes: list[ModelPass] = field(default_factory=list)

    def run(self, graph: gs.Graph, ctx: QuantContext) -> gs.Graph:
        """Run the graph passes on ``graph`` (in place)."""
        self.graph_passes(graph, ctx)
        return graph

    def export(self, graph: gs.Graph, ctx: QuantContext, template: onnx.ModelProto) -> onnx.ModelProto:
        """Run the graph passes, export, then run the model passes; returns the written model."""
        self.run(graph, ctx)
        model = g.to_model(graph, template=template)
        for p in self.model_passes:
            p(model, ctx)
        return model


def build_pipeline(config: Config, *, first: str = "float", last: str = "export") -> Pipeline:
    """The passes of ``config`` (resolved) from stage ``first`` to stage ``last`` (see :data:`STAGES`)."""
    if first not in STAGES or last not in STAGES or STAGES.index(first) > STAGES.index(last):
        raise UserError(f"pipeline stages {first!r}..{last!r}: use an order of {', '.join(STAGES)}")
    chosen = STAGES[STAGES.index(first): STAGES.index(last) + 1]
    passes = [p for stage in chosen for p in _BUILDERS[stage](config)]
    model_passes: list[ModelPass] = [ExportTwoBitPass(), WidenInt4Pass()] if "export" in chosen else []
    return Pipeline(PassManager(passes), model_passes)


def prepare_float(model: onnx.ModelProto, config: Config, calib=None) -> tuple[onnx.ModelProto, QuantContext]:
    """Upgrade the opset and run the float stage; returns the float reference and a fresh context.

    ``config`` must be resolved (:func:`onnxq.targets.resolve_config`).
    """
    from onnxq.targets.profiles import get_target

    ctx = QuantContext(config=config, target=get_target(config.target), calib=calib)
    graph = g.to_graph(g.infer_shapes(g.upgrade_opset(model, config.output_opset)))
    build_pipeline(config, last="float").run(graph, ctx)
    reference = g.infer_shapes(g.to_model(graph, template=model))
    return reference, ctx
