"""Public entry point: ``quantize(model, calib, config) -> QuantResult``.

The pipeline is data: a float phase (canonicalize, fold BatchNorm) that preserves the function,
then the quantization phase (assign specs, calibrate, insert QDQ, cleanup). The output is checked
and validated in onnxruntime against the user's original float model on held-out samples.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq import graph as g
from onnxq.calib import CalibrationSet, ImageRecipe, load_calibration, model_inputs
from onnxq.config import QuantConfig
from onnxq.context import QuantContext
from onnxq.errors import UserError
from onnxq.pass_infra import PassManager
from onnxq.passes.assign_specs import AssignSpecsPass
from onnxq.passes.calibrate import CalibratePass
from onnxq.passes.canonicalize import CanonicalizePass
from onnxq.passes.cleanup import CleanupPass
from onnxq.passes.fold_batchnorm import FoldBatchNormPass
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.targets import get_target
from onnxq.validate import ValidationReport, validate, write_report

log = logging.getLogger(__name__)

CalibSource = CalibrationSet | Iterable[Mapping[str, np.ndarray]] | str | Path

#: Batches set aside for validation when the caller gives none: a fifth, between 1 and 32.
_MAX_HOLDOUT = 32


@dataclass
class QuantResult:
    """The quantized model and the JSON-able report of the run."""

    model: onnx.ModelProto
    report: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    validation: ValidationReport | None = None

    def save(self, path: str | Path) -> Path:
        """Write the model atomically, and ``<stem>.report.json`` next to it."""
        out = g.save_model(self.model, path, source=self.source)
        write_report(self.report, out)
        return out


def _load(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (str, Path)):
        return g.load_model(model), Path(model)
    raise UserError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")


def prepare_float(model: onnx.ModelProto, config: QuantConfig) -> tuple[onnx.ModelProto, QuantContext]:
    """Upgrade the opset, run the float phase; returns the float reference and a fresh context."""
    ctx = QuantContext(config=config, target=get_target(config.target))
    work = g.infer_shapes(g.upgrade_opset(model, config.output_opset))
    graph = g.to_graph(work)
    PassManager([CanonicalizePass(), FoldBatchNormPass()])(graph, ctx)
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
        validation: held-out feeds for the fidelity check; None sets aside part of ``calib``.
        recipe: preprocessing for a folder of images.
        batch_size: samples per calibration batch for file sources.

    Returns:
        QuantResult with the QDQ model and its report.
    """
    config = config or QuantConfig()
    t0 = time.perf_counter()
    original, source = _load(model)
    inputs = model_inputs(original)
    calib_set = load_calibration(calib, inputs, recipe=recipe, batch_size=batch_size)
    if len(calib_set) == 0:
        raise UserError("the calibration data is empty: give at least one sample")
    if validation is None and len(calib_set) > 1:
        holdout = min(_MAX_HOLDOUT, max(1, len(calib_set) // 5))
        calib_set, val_set = calib_set.split(holdout)
    elif validation is None:
        log.warning("a single calibration batch: validating on the calibration sample itself")
        val_set = calib_set
    else:
        val_set = load_calibration(validation, inputs, recipe=recipe, batch_size=batch_size)

    reference, ctx = prepare_float(original, config)
    ctx.calib, ctx.reference = calib_set, reference
    graph = g.to_graph(reference)
    passes = [AssignSpecsPass(), CalibratePass(), InsertQDQPass()]
    if config.method != "rtn":
        from onnxq.passes.reconstruct import ReconstructPass

        passes.append(ReconstructPass(config.recon_config(), max_chain=config.max_chain,
                                      checkpoint_dir=config.checkpoint_dir,
                                      cache_budget_bytes=config.cache_budget_mb << 20,
                                      layerwise=config.method == "adaround"))
        passes.insert(-1, CleanupPass())  # unique node names: blocks refer to nodes by name
    PassManager([*passes, CleanupPass()])(graph, ctx)
    quantized = g.to_model(graph, template=original)
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
    val = None
    if config.validate:
        val = validate(original, quantized, val_set)
        report["validation"] = val.to_dict()
        log.info("validation:\n%s", val.summary())
        if not (val.checker_ok and val.runs_enable_all and val.runs_disable_all):
            raise RuntimeError("the quantized model failed validation: " + "; ".join(val.errors))
    return QuantResult(quantized, json.loads(json.dumps(report, default=_json_default)), source, val)


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


def input_summary(model: onnx.ModelProto) -> Sequence[str]:
    return [i.describe() for i in model_inputs(model)]
