"""Validate a quantized QDQ ONNX model against its float original in onnxruntime on CPU.

:func:`validate` measures, and :mod:`onnxq.report.verdict` judges (``ok``, or one line per failure
with its fix):

1. ``onnx.checker.check_model(full_check=True)`` on the quantized model;
2. the quantized model builds and runs in an ORT CPU session at ``ORT_ENABLE_ALL`` (ORT's fused
   integer kernels on this CPU, whose instruction-set family is recorded: :mod:`onnxq.core.cpu`) and at
   ``ORT_DISABLE_ALL`` (the QDQ simulation: dequantize, float op, quantize); ``levels`` is the fidelity
   of the first against the second (the kernel gap; ``levels_max_abs_diff`` its largest difference);
3. fidelity of each output against the float model (``ORT_ENABLE_ALL``) over all samples, of the fused
   run (``outputs``) and of the simulation (``simulation``) (:mod:`onnxq.report.metrics`: SQNR,
   cosine, max abs error, top-1 agreement);
4. the weight pairs onnxruntime's saturating kernels (x86 without VNNI) would get wrong, read from the
   file (:mod:`onnxq.report.kernel_check`);
5. what ORT made of the graph: integer kernels, heavy float ops and Q/DQ nodes left in the
   optimized graph (:func:`optimized_op_counts`), and the DQ constants (:func:`check_qdq_constants`);
6. ternary weights (:func:`onnxq.ternary.check.check_ternary`): every weight whose QuantSpec was
   2-bit holds only {-1, 0, 1} in the file, whatever its container (a code outside is an error
   line, so ``ok`` is False); per-layer and total sparsity and sizes go to ``ternary``.

A model that fails to build or run never raises: the failure becomes a line in ``errors`` and the
matching flag is False. Mistakes of the caller (no feeds, missing inputs, a >2 GB ModelProto)
raise :class:`onnxq.errors.UserError`. ``$ONNXQ_THREADS`` sets ORT's intra-op threads (default 0:
ORT's choice).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxq.core import mapped
from onnxq.core.cpu import describe
from onnxq.core.files import atomic_write_text
from onnxq.errors import UserError
from onnxq.report.kernel_check import saturating_pairs
from onnxq.report.metrics import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    OutputFidelity,
    check_qdq_constants,
    classify_ops,
    cosine,
    is_power_of_two,
    json_num,
    jsonable,
    level_gap,
    max_abs_err,
    output_fidelity,
    sqnr_db,
    top1_agreement,
)
from onnxq.report.sessions import (
    DISABLE_ALL,
    ENABLE_ALL,
    Runner,
    Source,
    check_feeds,
    collect_feeds,
    optimized_op_counts,
    saved_counts,
    short_error,
    threads,
)
from onnxq.report.verdict import Criteria, failures

logger = logging.getLogger(__name__)

__all__ = [
    "FLOAT_COMPUTE_OPS", "INTEGER_KERNELS", "OutputFidelity", "ValidationReport", "check_qdq_constants",
    "cosine", "is_power_of_two", "optimized_op_counts", "sqnr_db", "top1_agreement", "validate",
    "write_report",
]



@dataclass(frozen=True)
class ValidationReport:
    """Result of :func:`validate`. ``ok`` means: checker passed, both ORT levels ran, no errors, and every
    criterion of :mod:`onnxq.report.verdict` is met (``failures`` lists the others)."""

    checker_ok: bool
    checker_error: str | None
    runs_enable_all: bool
    runs_disable_all: bool
    levels_max_abs_diff: float
    outputs: tuple[OutputFidelity, ...]
    n_samples: int
    integer_kernels: dict[str, int] = field(default_factory=dict)
    float_compute_ops: dict[str, int] = field(default_factory=dict)
    qdq_left: dict[str, int] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    ternary: dict[str, Any] | None = None
    cpu: str = ""
    criteria: Criteria = field(default_factory=Criteria)
    levels: tuple[OutputFidelity, ...] = ()
    level_gaps: dict[str, float] = field(default_factory=dict)
    simulation: tuple[OutputFidelity, ...] = ()
    saturating_pairs: dict[str, int] = field(default_factory=dict)
    failures: tuple[str, ...] = ()
    data: str = "the given samples"  # what the fidelity was measured on (said in the summary)

    @property
    def ok(self) -> bool:
        """True when the checker passed, both optimization levels ran, nothing went wrong and every
        criterion is met."""
        return (self.checker_ok and self.runs_enable_all and self.runs_disable_all and not self.errors
                and not self.failures)

    @property
    def reason(self) -> str | None:
        """The first reason the model is not ok (None when it is)."""
        if self.ok:
            return None
        return (self.errors or self.failures or ("the model did not run",))[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the whole report (``json.dumps(..., allow_nan=False)`` works on it)."""
        return {
            "ok": self.ok,
            "failures": list(self.failures),
            "cpu": self.cpu,
            "criteria": self.criteria.to_dict(),
            "checker_ok": self.checker_ok,
            "checker_error": self.checker_error,
            "runs_enable_all": self.runs_enable_all,
            "runs_disable_all": self.runs_disable_all,
            "levels_max_abs_diff": json_num(self.levels_max_abs_diff, 6),
            "n_samples": self.n_samples,
            "data": self.data,
            "outputs": [o.to_dict() for o in self.outputs],
            "simulation": [o.to_dict() for o in self.simulation],
            "levels": [o.to_dict() for o in self.levels],
            "level_gaps": {k: json_num(v, 6) for k, v in self.level_gaps.items()},
            "saturating_pairs": dict(self.saturating_pairs),
            "integer_kernels": dict(self.integer_kernels),
            "float_compute_ops": dict(self.float_compute_ops),
            "qdq_left": dict(self.qdq_left),
            "constants": jsonable(self.constants),
            "errors": list(self.errors),
            **({"ternary": jsonable(self.ternary)} if self.ternary is not None else {}),
        }

    def summary(self) -> str:
        """A short multi-line human-readable summary."""
        def counts(d: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

        def runs(flag: bool) -> str:
            return "runs" if flag else "FAILS"

        judged = "fused kernels" if self.criteria.runtime == "ort-cpu" else "QDQ simulation"
        lines = [
            "validation: " + ("OK" if self.ok else f"FAILED: {self.reason}"),
            "checker: " + ("ok" if self.checker_ok else f"FAILED: {self.checker_error}"),
            f"CPU: {self.cpu}",
            f"ORT CPU: ENABLE_ALL {runs(self.runs_enable_all)}, DISABLE_ALL {runs(self.runs_disable_all)}, "
            f"max |ALL - DISABLE| = {self.levels_max_abs_diff:.4g}",
            f"samples: {self.n_samples} ({self.data}); judged on the {judged} (runtime {self.criteria.runtime})",
        ]
        for lv in self.levels:
            top1 = "" if lv.top1_agreement is None else f", top1 {100 * lv.top1_agreement:.2f}%"
            gap = self.level_gaps.get(lv.name, math.nan)
            lines.append(f"fused vs QDQ simulation {lv.name}: cos {lv.cosine:.6f}{top1}, adds {gap:.3g} x the "
                         f"quantization error (tolerance {self.criteria.levels_max_gap})")
        sims = {o.name: o for o in self.simulation}
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else f", top1 {100 * o.top1_agreement:.2f}%"
            sim = sims.get(o.name)
            sim_top1 = "" if sim is None or sim.top1_agreement is None else f", top1 {100 * sim.top1_agreement:.2f}%"
            lines.append(f"output {o.name}: SQNR {o.sqnr_db:.2f} dB, cos {o.cosine:.6f}, "
                         f"max|err| {o.max_abs_err:.4g}{top1}"
                         + ("" if sim is None else f" | QDQ simulation: cos {sim.cosine:.6f}{sim_top1}"))
        pairs = sum(self.saturating_pairs.values())
        lines.append(f"weight pairs saturating on x86 without VNNI: {pairs}"
                     + (f" in {len(self.saturating_pairs)} layers" if pairs else ""))
        lines.append(f"integer kernels: {counts(self.integer_kernels)}")
        lines.append(f"float compute left: {counts(self.float_compute_ops)}; "
                     f"Q/DQ left: {counts(self.qdq_left)}")
        if self.constants:
            c = self.constants
            lines.append(f"DQ constants: {c['n_const_dq']} ({counts(c['dtypes'])}), "
                         f"scales {'ok' if c['scales_ok'] else 'BAD'}, pow2 {c['pow2_scales']}"
                         + (f", unreadable {len(c['unreadable'])}" if c["unreadable"] else ""))
        if self.ternary is not None:
            t = self.ternary["total"]
            ratio = (f" = 1/{1 / t['file_vs_fp32']:.1f} of FP32 (2 bits a weight: 1/{1 / t['effective_vs_fp32']:.1f})"
                     if t["file_vs_fp32"] else "")
            lines.append(f"ternary weights: {t['layers']} tensors ({', '.join(t['containers'])}), sparsity "
                         f"{100 * t['sparsity']:.1f}%, {t['file_bytes']} bytes{ratio}, codes "
                         + ("ok" if self.ternary["ok"] else "OUTSIDE {-1, 0, 1} (see errors)"))
        lines.extend(f"error: {e}" for e in self.errors)
        lines.extend(f"failed: {f}" for f in self.failures)
        return "\n".join(lines)


def report_path(model_path: str | Path) -> Path:
    """``<model stem>.report.json`` beside the model."""
    path = Path(model_path)
    return path.with_name(path.stem + ".report.json")


def write_report(report: Mapping[str, Any] | ValidationReport, model_path: str | Path) -> Path:
    """Write ``<model stem>.report.json`` next to ``model_path`` atomically and return its path.

    The JSON goes to a temporary file in the same directory, which then replaces the target with
    ``os.replace``: a reader never sees a half-written report, and a failed write leaves the old
    one intact. Non-finite floats become ``"inf"``/``"-inf"``/null, numpy values plain Python ones.
    """
    data = report.to_dict() if isinstance(report, ValidationReport) else report
    if not isinstance(data, Mapping):
        raise UserError(f"write_report wants a mapping, got {type(report).__name__}: pass report.to_dict()")
    model_path = Path(model_path)
    if not model_path.parent.is_dir():
        raise UserError(f"directory {model_path.parent} does not exist: create it or fix the model path")
    target = report_path(model_path)
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    atomic_write_text(target, text)
    logger.info("wrote %s", target)
    return target


# ------------------------------------------------------------------------------------------- sessions


# ---------------------------------------------------------------------------------------------- feeds


# --------------------------------------------------------------------------------------------- checks


def _levels_diff(a_out: Mapping[str, np.ndarray], n_out: Mapping[str, np.ndarray], i: int,
                 errors: list[str]) -> float:
    """``max |y_ALL - y_DISABLE|`` over one sample's outputs (inf, with an error, if shapes differ)."""
    diff = 0.0
    for n, v in a_out.items():
        if v.shape != n_out[n].shape:
            errors.append(f"output {n!r} sample {i}: shape {v.shape} at ENABLE_ALL "
                          f"vs {n_out[n].shape} at DISABLE_ALL")
            return math.inf
        if v.size:
            diff = max(diff, max_abs_err(n_out[n], v))
    return diff


def _match_outputs(float_names: list[str], quant_names: list[str],
                   errors: list[str]) -> list[tuple[str, str]]:
    """(float name, quant name) pairs: by name, or by position when no name is shared and counts agree."""
    shared = [n for n in float_names if n in quant_names]
    if not shared and len(float_names) == len(quant_names):
        logger.warning("float and quant outputs share no name; matching them by position")
        return list(zip(float_names, quant_names))
    errors.extend(f"output {n!r} of the float model is missing from the quant model"
                  for n in float_names if n not in shared)
    return [(n, n) for n in shared]


def _checker(src: Source) -> str | None:
    """The full ONNX checker (path variant for files, so models over 2 GB work): the error or None."""
    try:
        if src.path is not None:
            onnx.checker.check_model(str(src.path), full_check=True)
        elif src.proto is not None and mapped.mapped_tensors(src.proto):
            with mapped.checkable_path(src.proto) as path:
                onnx.checker.check_model(path, full_check=True)
        else:
            onnx.checker.check_model(src.proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, protobuf decode errors ...
        return short_error(exc)
    return None


def _constants(src: Source, errors: list[str]) -> dict[str, Any]:
    """:func:`check_qdq_constants` of the model; failures and bad scales become error lines."""
    try:
        constants = check_qdq_constants(src.load())
    except Exception as exc:  # unreadable file: the session builds report it as well
        errors.append(f"check_qdq_constants: {short_error(exc)}")
        return {}
    if not constants["scales_ok"]:
        errors.append(f"DequantizeLinear scales not positive and finite: {constants['bad_scales']}")
    return constants


def _ternary(src: Source, errors: list[str]) -> dict[str, Any] | None:
    """:func:`onnxq.ternary.check.check_ternary` as a dict; its violations become error lines."""
    from onnxq.ternary.check import check_ternary

    try:
        report = check_ternary(src.load())
    except Exception as exc:  # unreadable file: the session builds report it as well
        errors.append(f"ternary check: {short_error(exc)}")
        return None
    if report is None:
        return None
    errors.extend(report.violations)
    return report.to_dict()


def validate(
    float_model: str | Path | onnx.ModelProto,
    quant_model: str | Path | onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    max_samples: int | None = None,
    criteria: Criteria | None = None,
    float_outputs: Mapping[str, list[np.ndarray]] | None = None,
) -> ValidationReport:
    """Validate ``quant_model`` against ``float_model`` in onnxruntime on CPU.

    Args:
        float_model: the float reference (path or ModelProto).
        quant_model: the quantized QDQ model (path or ModelProto; pass a path for models over 2 GB).
        feeds: dicts ``{input name: array}``, each with a batch dimension (int64 token ids are fine).
            Outputs are concatenated over feeds on axis 0; outputs whose non-batch shape varies
            between feeds are flattened per feed first.
        max_samples: use at most this many feed dicts (None: all); ``n_samples`` counts feed dicts.
        criteria: what ``ok`` demands (:class:`~onnxq.report.verdict.Criteria`; default: a portable
            model for onnxruntime on CPU, top-1 agreement >= 90 % or cosine >= 0.95).
        float_outputs: the float model's outputs on ``feeds`` at ``ORT_ENABLE_ALL`` (output name -> one array
            per feed), when the caller already has them: the float model is then not run again (a run keeps
            one session's copy of the weights in memory at a time).

    Returns:
        A :class:`ValidationReport`; the module docstring says what each field measures.

    Raises:
        UserError: empty or malformed feeds, feeds lacking an input of the float model or of the
            wrong dtype, a missing file, a ModelProto over 2 GB, a bad ``$ONNXQ_THREADS``.
    """
    criteria = criteria or Criteria()
    fsrc, qsrc = Source.of(float_model, "float_model"), Source.of(quant_model, "quant_model")
    samples = collect_feeds(feeds, max_samples)
    threads()  # fail early on a bad $ONNXQ_THREADS
    errors: list[str] = []
    checker_error = _checker(qsrc)
    if checker_error is not None:
        errors.append(f"checker: {checker_error}")
    constants = _constants(qsrc, errors)
    ternary = _ternary(qsrc, errors)
    saturating = _saturating(qsrc, errors)

    # One session at a time (each holds a copy of its weights): the float model, the fused kernels, the
    # simulation; each runs every sample and is released before the next is built.
    if float_outputs is None:
        fl = Runner("float model ORT_ENABLE_ALL", fsrc, ENABLE_ALL, errors)
        if fl.sess is not None:
            check_feeds(samples, fl.sess)
        ref, float_names, float_ok = _run_all(fl, samples), fl.names, fl.ok
    else:
        if any(len(v) != len(samples) for v in float_outputs.values()):
            raise ValueError("float_outputs must hold one array per feed for every output")
        ref, float_names, float_ok = {n: list(v) for n, v in float_outputs.items()}, list(float_outputs), True
    with tempfile.TemporaryDirectory(prefix="onnxq-validate-") as tmp:
        qa = Runner("quant model ORT_ENABLE_ALL", qsrc, ENABLE_ALL, errors, save_dir=tmp)
        counts = saved_counts(tmp) if qa.sess is not None else {}
    got = _run_all(qa, samples)
    qn = Runner("quant model ORT_DISABLE_ALL", qsrc, DISABLE_ALL, errors)
    sim = _run_all(qn, samples)

    levels_diff = 0.0
    for i in range(len(samples)):
        a_out = {n: v[i] for n, v in got.items()} if qa.ok else None
        n_out = {n: v[i] for n, v in sim.items()} if qn.ok else None
        if a_out is not None and n_out is not None and math.isfinite(levels_diff):
            levels_diff = max(levels_diff, _levels_diff(a_out, n_out, i, errors))

    matched = _match_outputs(float_names, qa.names, errors) if float_ok and qa.ok and qn.ok else []
    outputs = _fidelities(matched, ref, got, errors)
    simulation = _fidelities(matched, ref, sim, errors)
    levels = _fidelities([(q, q) for _, q in matched], sim, got, errors)
    gaps = {f: level_gap(ref[f], sim[q], got[q]) for f, q in matched if any(lv.name == q for lv in levels)}
    judged = outputs if criteria.runtime == "ort-cpu" else simulation
    cpu = describe()
    failed = failures(criteria, fidelity=tuple(judged), gaps=gaps, saturating=saturating, cpu=cpu)
    ints, flts, qdq = classify_ops(counts)
    return ValidationReport(
        checker_ok=checker_error is None,
        checker_error=checker_error,
        runs_enable_all=qa.ok,
        runs_disable_all=qn.ok,
        levels_max_abs_diff=levels_diff if qa.ok and qn.ok else math.nan,
        outputs=tuple(outputs),
        n_samples=len(samples),
        integer_kernels=ints,
        float_compute_ops=flts,
        qdq_left=qdq,
        constants=constants,
        errors=tuple(errors),
        ternary=ternary,
        cpu=cpu,
        criteria=criteria,
        levels=tuple(levels),
        level_gaps=gaps,
        simulation=tuple(simulation),
        saturating_pairs=saturating,
        failures=tuple(failed),
    )


def _run_all(runner: Runner, samples: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """``runner``'s outputs on every sample (it stops at its first failure: ``runner.ok``), then its
    session is released."""
    out: dict[str, list[np.ndarray]] = {n: [] for n in runner.names}
    for i, feed in enumerate(samples):
        result = runner.run(feed, i)
        if result is None:
            break
        for n, v in result.items():
            out[n].append(v)
    runner.sess = None
    return out


def _fidelities(matched: list[tuple[str, str]], refs: dict[str, list[np.ndarray]],
                tests: dict[str, list[np.ndarray]], errors: list[str]) -> list[OutputFidelity]:
    out: list[OutputFidelity] = []
    for ref_name, test_name in matched:
        fid = output_fidelity(ref_name, refs[ref_name], tests[test_name])
        if isinstance(fid, str):
            errors.append(fid)
        else:
            out.append(fid)
    return out


def _saturating(src: Source, errors: list[str]) -> dict[str, int]:
    """:func:`onnxq.report.kernel_check.saturating_pairs` of the model (unreadable: an error line)."""
    try:
        return saturating_pairs(src.load())
    except Exception as exc:  # unreadable file: the session builds report it as well
        errors.append(f"kernel check: {short_error(exc)}")
        return {}
