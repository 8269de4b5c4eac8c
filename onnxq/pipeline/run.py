"""One quantization run: load, split off validation data, run the pipeline, check, validate, report.

The output is checked against its target's rules (:mod:`onnxq.targets.rules`; a violation is an
internal error) and validated in onnxruntime against the user's original float model on held-out
samples. The report records the configuration as asked and as resolved.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.config import Config
from onnxq.config.choices import UNTRAINED_ROUNDING
from onnxq.core import graph as g
from onnxq.core import mapped, memory
from onnxq.core.context import QuantContext
from onnxq.data.loaders import CalibrationSet, ImageRecipe, load_calibration, model_inputs
from onnxq.data.sanity import degenerate_inputs
from onnxq.errors import UserError
from onnxq.pipeline.build import build_pipeline, prepare_float
from onnxq.pipeline.result import QuantResult
from onnxq.recon.engine import require_device
from onnxq.report.metrics import INTEGER_KERNELS
from onnxq.report.sessions import ENABLE_ALL, Source, build_session, inputs_for, short_error
from onnxq.report.validate import ValidationReport, validate
from onnxq.report.verdict import criteria_for
from onnxq.targets.profiles import resolve_config
from onnxq.targets.rules import check_target, format_violations
from onnxq.ternary.check import check_ternary

log = logging.getLogger(__name__)

CalibSource = CalibrationSet | Iterable[Mapping[str, np.ndarray]] | str | Path


def load_model(model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    """The model and the path it came from (None for a ModelProto, which is never modified)."""
    if isinstance(model, onnx.ModelProto):
        return model, None
    if isinstance(model, (str, Path)):
        return g.load_model(model), Path(model)
    raise UserError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")


def nothing_quantized(model: onnx.ModelProto, float_ops: Mapping[str, str]) -> str | None:
    """A line naming why each op stayed float, when the output holds no quantized op at all."""
    if any(n.op_type == "DequantizeLinear" or n.op_type.startswith("QLinear") or n.op_type in INTEGER_KERNELS
           for n in model.graph.node):
        return None
    by_reason: dict[str, list[str]] = {}
    for node, reason in float_ops.items():
        by_reason.setdefault(reason, []).append(node)
    detail = "; ".join(f"{reason}: {', '.join(nodes[:3])}{' ...' if len(nodes) > 3 else ''}"
                       for reason, nodes in by_reason.items()) or "no op onnxq quantizes (Conv, Gemm, MatMul, ...)"
    return f"nothing was quantized ({detail}): the output is the float model"


def check_float_runs(model: onnx.ModelProto, source: Path | None, feed: Mapping[str, np.ndarray]
                     ) -> ort.InferenceSession:
    """Run the float model once in onnxruntime (``ORT_ENABLE_ALL``, as the validator does) on the first
    calibration batch: a model onnxruntime refuses (mismatched types or shapes, duplicate names, an
    opset it does not know), or that fails or gives NaN on the data, is a one-line error now instead of
    a failure deep in a pass. Returns the session."""
    # A model read in place runs from its mapped proto: onnxruntime then never parses the weights of a
    # large single file (its parse holds them twice).
    given = source if source is not None and not mapped.mapped_tensors(model) else model
    sess, error = build_session(Source.of(given, "the float model"), ENABLE_ALL)
    if sess is None:
        raise UserError(f"onnxruntime cannot load the float model ({error}): fix the export; onnxq "
                        "quantizes models onnxruntime runs")
    try:
        outputs = sess.run(None, dict(feed))
    except Exception as exc:
        raise UserError(f"onnxruntime cannot run the float model on the first calibration batch "
                        f"({short_error(exc)}): check the data's shapes and types, or the export") from None
    for meta, value in zip(sess.get_outputs(), outputs, strict=True):
        arr = np.asarray(value)
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            raise UserError(f"the float model's output {meta.name!r} is NaN or infinite on the first "
                            "calibration batch: check the data's range and preprocessing")
    return sess


def float_outputs(sess: ort.InferenceSession, val_set: CalibrationSet) -> dict[str, list[np.ndarray]] | None:
    """The float model's outputs on every validation batch (what the validator compares against), computed
    while its session is open anyway; None when a batch fails (the validator then reports it)."""
    names = [o.name for o in sess.get_outputs()]
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in val_set:
        try:
            values = sess.run(None, inputs_for(sess, feed))
        except Exception:  # the validator runs the float model itself and says what failed
            return None
        for n, v in zip(names, values, strict=True):
            out[n].append(np.asarray(v))
    return out


def split_validation(calib_set: CalibrationSet, config: Config) -> tuple[CalibrationSet, CalibrationSet]:
    """(calibration, validation): :meth:`~onnxq.config.sections.Validation.holdout` samples in whole
    batches held out of calibration; a single batch is validated on itself (with a warning)."""
    if len(calib_set) <= 1:
        log.warning("a single calibration batch: validating on the calibration sample itself")
        return calib_set, calib_set
    v = config.validation
    per_batch = max(1, calib_set.num_samples // len(calib_set))
    wanted = max(1, v.holdout(calib_set.num_samples))
    return calib_set.split(max(1, min(len(calib_set) // 2, round(wanted / per_batch))))


@dataclass(frozen=True)
class PreparedRun:
    """What every quantization of one run starts from: the model, its data split and the resolved config."""

    requested: Config
    config: Config
    original: onnx.ModelProto
    source: Path | None
    calib_set: CalibrationSet
    val_set: CalibrationSet
    validation_given: bool
    degenerate: tuple[str, ...]
    started: float
    float_outputs: Mapping[str, list[np.ndarray]] | None = None  # on val_set, when validation is on

    @property
    def float_model(self) -> Path | onnx.ModelProto:
        """The user's float model as onnxruntime should load it: its file (external data mapped), else the proto."""
        return self.source if self.source is not None else self.original


def prepare_run(model: str | Path | onnx.ModelProto, calib: CalibSource, config: Config, *,
                validation: CalibSource | None = None, recipe: ImageRecipe | None = None,
                batch_size: int = 1) -> PreparedRun:
    """Resolve ``config``, load the model and the data, check that onnxruntime runs the float model and
    hold validation samples out (the steps before any pass runs)."""
    requested = config
    config = resolve_config(config)
    if config.method not in UNTRAINED_ROUNDING or config.mixed_precision.enabled:
        require_device(config.engine.device)  # before any work
    t0 = time.perf_counter()
    original, source = load_model(model)
    inputs = model_inputs(original)
    calib_set = load_calibration(calib, inputs, recipe=recipe, batch_size=batch_size)
    if len(calib_set) == 0:
        raise UserError("the calibration data is empty: give at least one sample")
    sess = check_float_runs(original, source, calib_set[0])
    degenerate = degenerate_inputs(calib_set)
    for line in degenerate:
        log.warning("calibration data look degenerate: %s", line)
    if validation is None:
        calib_set, val_set = split_validation(calib_set, config)
    else:
        val_set = load_calibration(validation, inputs, recipe=recipe, batch_size=batch_size)
    # The validator's float reference now, while this session holds the float weights: the quantized
    # model never shares memory with a float session.
    reference = float_outputs(sess, val_set) if config.validation.enabled else None
    del sess
    return PreparedRun(requested, config, original, source, calib_set, val_set, validation is not None,
                       tuple(degenerate), t0, reference)


def quantize_prepared(run: PreparedRun, config: Config | None = None) -> tuple[onnx.ModelProto, QuantContext]:
    """The quantized model and the run's context, with ``config`` (resolved; default: the run's)."""
    config = config or run.config
    reference, ctx = prepare_float(run.original, config, run.calib_set)
    ctx.reference = reference
    quantized = build_pipeline(config, first="plan").export(g.to_graph(reference), ctx, template=run.original)
    return quantized, ctx


def run_quantize(model: str | Path | onnx.ModelProto, calib: CalibSource, config: Config, *,
                 validation: CalibSource | None = None, recipe: ImageRecipe | None = None,
                 batch_size: int = 1) -> QuantResult:
    """Quantize ``model`` with ``config`` (see :func:`onnxq.api.quantize`, which adds mixed precision and
    the accuracy target)."""
    run = prepare_run(model, calib, config, validation=validation, recipe=recipe, batch_size=batch_size)
    quantized, ctx = quantize_prepared(run)
    return finish_run(run, quantized, ctx)


def finish_run(run: PreparedRun, quantized: onnx.ModelProto, ctx: QuantContext, *,
               extra_report: Mapping[str, Any] | None = None, extra_failures: tuple[str, ...] = ()) -> QuantResult:
    """Report, check against the target's rules and validate ``quantized`` (``extra_failures`` join the
    validation's failures)."""
    config, source = ctx.config, run.source
    report: dict[str, Any] = {
        "onnxq_version": _version(),
        "config": config.to_dict(),
        "config_requested": run.requested.to_dict(),
        "source": str(source) if source else None,
        "quantize_seconds": round(time.perf_counter() - run.started, 2),
        "opset": g.default_opset(quantized),
        "float_ops": dict(sorted(ctx.float_ops.items())),
        **ctx.report,
        **(extra_report or {}),
    }
    report["target_check"] = _check_output(quantized, ctx)
    degenerate = list(run.degenerate)
    if degenerate:
        report["calibration_data"] = {"degenerate": degenerate}
    unquantized = nothing_quantized(quantized, ctx.float_ops)
    if unquantized:
        log.warning("%s", unquantized)
        report["nothing_quantized"] = unquantized
    val = None
    if config.validation.enabled:
        memory.collect()  # the pipeline's graph, before the validator's sessions
        val = validate(run.float_model, quantized, run.val_set, criteria=criteria_for(config),
                       float_outputs=run.float_outputs)
        extra = ([unquantized] if unquantized else []) + \
            ([f"the calibration data look degenerate ({degenerate[0]}); a check held out from them cannot vouch "
              "for real inputs: pass --validation with real samples"] if degenerate and not run.validation_given
             else []) + list(extra_failures)
        val = dataclasses.replace(val, failures=val.failures + tuple(extra),
                                  data="the validation data given" if run.validation_given
                                  else "samples held out of the calibration data")
        report["validation"] = val.to_dict()
        log.info("validation:\n%s", val.summary())
        if not (val.checker_ok and val.runs_enable_all and val.runs_disable_all):
            raise RuntimeError("the quantized model failed validation: " + "; ".join(val.errors))
        if config.validation.details:
            report.update(_details(run, quantized, ctx))
    _two_bit_report(quantized, ctx, val, report)
    return QuantResult(quantized, json.loads(json.dumps(report, default=_json_default)), source, val)


def _details(run: PreparedRun, quantized: onnx.ModelProto, ctx: QuantContext) -> dict[str, Any]:
    """The report page's measurements: per-tensor error along depth and ranges, a quick latency check."""
    from onnxq.report.latency import quick_latency
    from onnxq.report.layers import LAYER_SAMPLES, layer_errors

    reference = ctx.reference
    if reference is None or max(g.proto_size(quantized), g.proto_size(reference)) >= g.PROTO_LIMIT:
        return {"details_skipped": "a model over 2 GB: no per-tensor errors or latency"}
    if mapped.mapped_tensors(reference):
        return {"details_skipped": f"weights over {mapped.MAPPED_MIN_BYTES >> 20} MiB read in place: no per-tensor "
                                   "errors or latency (they would hold a second copy of the weights)"}
    t0 = time.perf_counter()
    feeds = [run.val_set[i] for i in range(run.val_set.leading_batches(LAYER_SAMPLES))]
    out = {"layers": layer_errors(reference, quantized, feeds),
           "latency": quick_latency(run.float_model, quantized, feeds[0], run.val_set.batch_sizes[0])}
    log.debug("report details in %.1f s", time.perf_counter() - t0)
    return out


def _check_output(model: onnx.ModelProto, ctx: QuantContext) -> dict[str, Any]:
    """Run the target's rule checker on our own output: a violation is an internal error."""
    target = ctx.target
    violations = check_target(model, target)
    if violations:
        raise RuntimeError(f"internal error: the output violates target {target.name} "
                           f"({len(violations)} violation(s)):\n{format_violations(violations)}")
    return {"target": target.name, "ok": True, "violations": [], "activation_bits": ctx.config.activations.bits}


def _two_bit_report(model: onnx.ModelProto, ctx: QuantContext, val: ValidationReport | None,
                    report: dict[str, Any]) -> None:
    """``report["ternary"]`` (method, container, sparsity and sizes; codes outside {-1, 0, 1} raise) and
    ``report["int2"]`` (the 4-level grid's layers and container)."""
    ternary = ctx.two_bit_export.get("ternary")
    if ternary is not None:
        checked = val.ternary if val is not None else None
        if checked is None:
            result = check_ternary(model)
            checked = result.to_dict() if result is not None else {"ok": False, "violations": ["no ternary tensor"]}
        report["ternary"] = {"method": ctx.config.weights.ternary_method, "storage": ternary["storage"], **checked}
        if ternary.get("int2_cast"):  # onnxq.core.weight_cast: int2 in the file, int8 kernels in onnxruntime
            report["ternary"]["int2_cast_to_int8"] = ternary["int2_cast"]
        if not checked["ok"]:
            raise RuntimeError("the quantized model failed the ternary check: " + "; ".join(checked["violations"]))
    int2 = ctx.two_bit_export.get("int2")
    if int2 is not None:
        report["int2"] = {"grid": "uniform [-2, 1] with zero-points", "storage": int2["storage"],
                          "layers": len(ctx.two_bit_codes["int2"]),
                          **({"int2_cast_to_int8": int2["int2_cast"]} if int2.get("int2_cast") else {})}


def _json_default(obj: object) -> object:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    return str(obj)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxq")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
