"""Public entry point: ``quantize(model, calib, config) -> QuantResult``.

The pipeline is data: a float phase (canonicalize, fold BatchNorm) that preserves the function,
then the quantization phase (assign specs, calibrate, align scales, insert QDQ, [reconstruct],
[statistics tuning], [bias tuning], cleanup). The output
is checked against its target's rules (:mod:`onnxq.targets.rules`; a violation is an internal error) and
validated in onnxruntime against the user's original float model on held-out samples.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.config.legacy import QuantConfig
from onnxq.core import graph as g
from onnxq.core.context import QuantContext
from onnxq.core.pass_infra import PassManager
from onnxq.data.loaders import CalibrationSet, ImageRecipe, load_calibration, model_inputs
from onnxq.errors import UserError
from onnxq.passes.export.cleanup import CleanupPass
from onnxq.passes.float.absorb_bias import AbsorbBiasPass
from onnxq.passes.float.canonicalize import CanonicalizePass
from onnxq.passes.float.equalize_weights import EqualizeWeightsPass
from onnxq.passes.float.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.quant.align_scales import AlignScalesPass
from onnxq.passes.quant.assign_specs import AssignSpecsPass
from onnxq.passes.quant.calibrate import CalibratePass
from onnxq.passes.quant.correct_bias import CorrectBiasPass
from onnxq.passes.quant.insert_qdq import InsertQDQPass
from onnxq.report.validate import ValidationReport, validate, write_report
from onnxq.targets.profiles import get_target, resolve_config
from onnxq.targets.rules import check_target, format_violations
from onnxq.ternary.check import check_ternary
from onnxq.ternary.export import finish_two_bit_model

log = logging.getLogger(__name__)

CalibSource = CalibrationSet | Iterable[Mapping[str, np.ndarray]] | str | Path

#: Samples set aside for validation when the caller gives none: an eighth, at most 32.
_MAX_HOLDOUT = 32


@dataclass
class QuantResult:
    """The quantized model and the JSON-able report of the run."""

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    validation: ValidationReport | None = None

    def save(self, path: str | Path) -> Path:
        """Write the model atomically, ``<stem>.report.json`` next to it, and the target's extra
        files (``<stem>.encodings`` for the qnn profiles, :mod:`onnxq.targets.encodings`)."""
        out = g.save_model(self.model, path, source=self.source)
        target = (self.report.get("config") or {}).get("target")
        if target and "aimet_encodings" in get_target(target).exporters:
            from onnxq.targets.encodings import write_encodings

            write_encodings(self.model, out.with_suffix(".encodings"))
        if self.report.get("mrecg"):  # the loss-along-depth figure, <stem>.mrecg.png
            from onnxq.report.mrecg_plot import plot_mrecg

            png = plot_mrecg(self.report["mrecg"], out.with_suffix(".mrecg.png"))
            self.report["mrecg"]["plot"] = str(png)
        write_report(self.report, out)
        return out


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (str, Path)):
        return g.load_model(model), Path(model)
    raise UserError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")


def prepare_float(model: onnx.ModelProto, config: QuantConfig, calib: CalibrationSet | None = None
                  ) -> tuple[onnx.ModelProto, QuantContext]:
    """Upgrade the opset, run the float phase; returns the float reference and a fresh context.

    ``ctx.config`` is ``config`` made consistent with its target (:func:`onnxq.targets.profiles.resolve_config`).
    """
    config = resolve_config(config)
    ctx = QuantContext(config=config, target=get_target(config.target), calib=calib)
    work = g.infer_shapes(g.upgrade_opset(model, config.output_opset))
    graph = g.to_graph(work)
    float_passes = [CanonicalizePass(), FoldBatchNormPass()]
    if config.equalize:
        float_passes.append(EqualizeWeightsPass(relu6=config.relu6))
    if config.bias_absorb is not None:
        float_passes.append(AbsorbBiasPass(source=config.bias_absorb))
    PassManager(float_passes)(graph, ctx)
    reference = g.infer_shapes(g.to_model(graph, template=model))
    return reference, ctx


def quantize(model: str | Path | onnx.ModelProto, calib: CalibSource, config: QuantConfig | None = None, *,
             validation: CalibSource | None = None, recipe: ImageRecipe | None = None,
             batch_size: int = 1) -> QuantResult:
    """Quantize ``model`` to QDQ with calibration data ``calib``.

    Args:
        model: path to an .onnx file or a ModelProto (never modified).
        calib: CalibrationSet, iterable of feed dicts, or a path (.npz, .npy, folder of images).
        config: the run's QuantConfig (defaults: W8A8 per-channel for onnxruntime CPU).
        validation: held-out feeds for the fidelity check; None sets aside an eighth of ``calib``
            (at most 32 samples, at least one batch).
        recipe: preprocessing for a folder of images.
        batch_size: samples per calibration batch for file sources.

    Returns:
        QuantResult with the QDQ model and its report.
    """
    config = resolve_config(config or QuantConfig())
    t0 = time.perf_counter()
    original, source = _load(model)
    inputs = model_inputs(original)
    calib_set = load_calibration(calib, inputs, recipe=recipe, batch_size=batch_size)
    if len(calib_set) == 0:
        raise UserError("the calibration data is empty: give at least one sample")
    if validation is None and len(calib_set) > 1:
        per_batch = max(1, calib_set.num_samples // len(calib_set))
        wanted = min(_MAX_HOLDOUT, max(1, calib_set.num_samples // 8))
        calib_set, val_set = calib_set.split(max(1, min(len(calib_set) // 2, round(wanted / per_batch))))
    elif validation is None:
        log.warning("a single calibration batch: validating on the calibration sample itself")
        val_set = calib_set
    else:
        val_set = load_calibration(validation, inputs, recipe=recipe, batch_size=batch_size)

    reference, ctx = prepare_float(original, config, calib_set)
    ctx.reference = reference
    graph = g.to_graph(reference)
    passes = [AssignSpecsPass(), CalibratePass(), AlignScalesPass()]
    if config.bias_correction is not None:
        passes.append(CorrectBiasPass(source=config.bias_correction))
    passes.append(InsertQDQPass())
    if config.method != "rtn":
        passes.append(_reconstruction_pass(config))
        passes.insert(-1, CleanupPass())  # unique node names: blocks refer to nodes by name
    if config.stats_tuning:
        from onnxq.passes.tune.tune_stats import TuneStatsPass

        passes.append(TuneStatsPass())
    if config.bias_tuning:
        from onnxq.passes.tune.tune_bias import TuneBiasPass

        passes.append(TuneBiasPass())
    if ctx.target.bias_grid:  # last: the passes above may move scales and biases
        from onnxq.passes.quant.grid_bias import GridBiasPass

        passes.append(GridBiasPass())
    PassManager([*passes, CleanupPass()])(graph, ctx)
    quantized = g.to_model(graph, template=original)
    ternary_info, int2_info = finish_two_bit_model(quantized, ctx.report)
    seconds = time.perf_counter() - t0

    report: dict[str, Any] = {
        "onnxq_version": _version(),
        "config": config.to_dict(),
        "source": str(source) if source else None,
        "quantize_seconds": round(seconds, 2),
        "opset": g.default_opset(quantized),
        "float_ops": dict(sorted(ctx.float_ops.items())),
        **{k: v for k, v in ctx.report.items()},
    }
    report["target_check"] = _check_output(quantized, ctx)
    val = None
    if config.validate:
        val = validate(original, quantized, val_set)
        report["validation"] = val.to_dict()
        log.info("validation:\n%s", val.summary())
        if not (val.checker_ok and val.runs_enable_all and val.runs_disable_all):
            raise RuntimeError("the quantized model failed validation: " + "; ".join(val.errors))
    if ternary_info:
        _check_ternary(quantized, ternary_info, val, report)
    if int2_info:
        report["int2"] = {"grid": "uniform [-2, 1] with zero-points", "storage": int2_info["storage"],
                          "layers": len(int2_info["codes"]),
                          **({"int2_cast_to_int8": int2_info["int2_cast"]} if int2_info.get("int2_cast") else {})}
    return QuantResult(quantized, json.loads(json.dumps(report, default=_json_default)), source, val)


def _reconstruction_pass(config: QuantConfig):
    """The pass of ``config.method`` (not rtn): AdaQuant, MRECG, or block/layer-wise reconstruction."""
    common = dict(checkpoint_dir=config.checkpoint_dir, keep_checkpoint=config.keep_checkpoint,
                  cache_budget_bytes=config.cache_budget_mb << 20)
    if config.method == "adaquant":
        from onnxq.passes.rounding.adaquant import AdaQuantPass

        return AdaQuantPass(config.adaquant_config(), **common)
    if config.method == "mrecg":
        from onnxq.passes.rounding.mrecg import MRECGPass

        return MRECGPass(config.recon_config(), k=config.mrecg_k, capacity=config.mrecg_capacity,
                         iters=config.mrecg_iters_used(), max_chain=config.max_chain, **common)
    from onnxq.passes.rounding.reconstruct import ReconstructPass

    return ReconstructPass(config.recon_config(), max_chain=config.max_chain,
                           layerwise=config.method == "adaround", **common)


def _check_output(model: onnx.ModelProto, ctx: QuantContext) -> dict[str, Any]:
    """Run the target's rule checker on our own output: a violation is an internal error."""
    target = ctx.target
    violations = check_target(model, target)
    if violations:
        raise RuntimeError(f"internal error: the output violates target {target.name} "
                           f"({len(violations)} violation(s)):\n{format_violations(violations)}")
    return {"target": target.name, "ok": True, "violations": [],
            "activation_bits": target.act_bits(ctx.config)}


def _check_ternary(model: onnx.ModelProto, info: dict[str, Any], val: ValidationReport | None,
                   report: dict[str, Any]) -> None:
    """``report["ternary"]``: method, container, sparsity and sizes; codes outside {-1, 0, 1} raise."""
    checked = val.ternary if val is not None else None
    if checked is None:
        result = check_ternary(model)
        checked = result.to_dict() if result is not None else {"ok": False, "violations": ["no ternary tensor"]}
    report["ternary"] = {"method": info["method"], "storage": info["storage"], **checked}
    if info.get("int2_cast"):  # onnxq.core.int2_cast: int2 in the file, int8 kernels in onnxruntime
        report["ternary"]["int2_cast_to_int8"] = info["int2_cast"]
    if not checked["ok"]:
        raise RuntimeError("the quantized model failed the ternary check: " + "; ".join(checked["violations"]))


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    return str(obj)


def _version() -> str:
    from onnxq import __version__

    return __version__

