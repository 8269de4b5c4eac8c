"""Validate a quantized QDQ ONNX model against its float original in onnxruntime on CPU.

:func:`validate` runs four checks and returns a :class:`ValidationReport`:

1. ``onnx.checker.check_model(full_check=True)`` on the quantized model;
2. the quantized model builds and runs in an ORT CPU session at ``ORT_ENABLE_ALL`` (ORT's fused
   integer kernels) and at ``ORT_DISABLE_ALL`` (the reference QDQ semantics: dequantize, float op,
   quantize); their largest disagreement is ``levels_max_abs_diff = max |y_ALL - y_DISABLE|``;
3. fidelity of each output, quantized (``ORT_ENABLE_ALL``) against float (``ORT_ENABLE_ALL``), over
   all samples (:mod:`onnxq.report.metrics`: SQNR, cosine, max abs error, top-1 agreement);
4. what ORT made of the graph: integer kernels, heavy float ops and Q/DQ nodes left in the
   optimized graph (:func:`optimized_op_counts`), and the DQ constants (:func:`check_qdq_constants`);
5. ternary weights (:func:`onnxq.ternary.check.check_ternary`): every weight whose QuantSpec was
   2-bit holds only {-1, 0, 1} in the file, whatever its container (a code outside is an error
   line, so ``ok`` is False); per-layer and total sparsity and sizes go to ``ternary``.

A model that fails to build or run never raises: the failure becomes a line in ``errors`` and the
matching flag is False. Mistakes of the caller (no feeds, missing inputs, a >2 GB ModelProto)
raise :class:`onnxq.errors.UserError`. ``$ONNXQ_THREADS`` sets ORT's intra-op threads (default 0:
ORT's choice).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx.external_data_helper import uses_external_data

from onnxq.errors import UserError
from onnxq.report.metrics import (
    FLOAT_COMPUTE_OPS,
    INTEGER_KERNELS,
    OutputFidelity,
    check_qdq_constants,
    classify_ops,
    cosine,
    count_ops,
    is_power_of_two,
    json_num,
    jsonable,
    max_abs_err,
    output_fidelity,
    sqnr_db,
    top1_agreement,
)

logger = logging.getLogger(__name__)

__all__ = [
    "FLOAT_COMPUTE_OPS", "INTEGER_KERNELS", "OutputFidelity", "ValidationReport", "check_qdq_constants",
    "cosine", "is_power_of_two", "optimized_op_counts", "sqnr_db", "top1_agreement", "validate",
    "write_report",
]

_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
_NONE = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
_TWO_GB = 2**31 - 1


@dataclass(frozen=True)
class ValidationReport:
    """Result of :func:`validate`. ``ok`` means: checker passed, both ORT levels ran, no errors."""

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

    @property
    def ok(self) -> bool:
        """True when the checker passed, both optimization levels ran and nothing went wrong."""
        return self.checker_ok and self.runs_enable_all and self.runs_disable_all and not self.errors

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the whole report (``json.dumps(..., allow_nan=False)`` works on it)."""
        return {
            "ok": self.ok,
            "checker_ok": self.checker_ok,
            "checker_error": self.checker_error,
            "runs_enable_all": self.runs_enable_all,
            "runs_disable_all": self.runs_disable_all,
            "levels_max_abs_diff": json_num(self.levels_max_abs_diff, 6),
            "n_samples": self.n_samples,
            "outputs": [o.to_dict() for o in self.outputs],
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

        lines = [
            "validation: " + ("OK" if self.ok else "FAILED"),
            "checker: " + ("ok" if self.checker_ok else f"FAILED: {self.checker_error}"),
            f"ORT CPU: ENABLE_ALL {runs(self.runs_enable_all)}, DISABLE_ALL {runs(self.runs_disable_all)}, "
            f"max |ALL - DISABLE| = {self.levels_max_abs_diff:.4g}",
            f"samples: {self.n_samples}",
        ]
        for o in self.outputs:
            top1 = "" if o.top1_agreement is None else f", top1 {100 * o.top1_agreement:.2f}%"
            lines.append(f"output {o.name}: SQNR {o.sqnr_db:.2f} dB, cos {o.cosine:.6f}, "
                         f"max|err| {o.max_abs_err:.4g}{top1}")
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
        return "\n".join(lines)


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
    target = model_path.with_name(model_path.stem + ".report.json")
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("wrote %s", target)
    return target


# ------------------------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class _Source:
    """A model given as a file path or as an in-memory ModelProto (serialized once for ORT)."""

    path: Path | None
    proto: onnx.ModelProto | None
    data: bytes | None

    @staticmethod
    def of(model: str | Path | onnx.ModelProto, what: str) -> _Source:
        if isinstance(model, onnx.ModelProto):
            try:
                size = model.ByteSize()
            except Exception:  # some protobuf builds refuse to size a message over 2 GB
                size = _TWO_GB + 1
            if size > _TWO_GB:
                raise UserError(f"{what} is a {size / 2**30:.1f} GB ModelProto, over protobuf's 2 GB "
                                "limit: save it with onnx.save(model, path, save_as_external_data=True) "
                                "and pass the path")
            if any(uses_external_data(t) for t in model.graph.initializer):
                raise UserError(f"{what} references external data that is not loaded: pass the model's path, "
                                "or load it with onnx.load(path) (load_external_data=True)")
            return _Source(None, model, model.SerializeToString())
        if isinstance(model, (str, os.PathLike)):
            if not Path(model).is_file():
                raise UserError(f"{what} {str(model)!r} is not a file: pass the path of an .onnx model")
            return _Source(Path(model), None, None)
        raise UserError(f"{what} must be a path or an onnx.ModelProto, got {type(model).__name__}")

    def ort_input(self) -> str | bytes:
        return str(self.path) if self.path is not None else self.data  # type: ignore[return-value]

    def load(self) -> onnx.ModelProto:
        return self.proto if self.proto is not None else onnx.load(str(self.path))


def short_error(exc: BaseException) -> str:
    """One line from an exception, without ORT's source location and C++ signature."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\) ", "", text)


def _threads() -> int:
    """Intra-op threads: ``$ONNXQ_THREADS`` when set, else 0 (ORT's default)."""
    raw = os.environ.get("ONNXQ_THREADS", "").strip()
    if raw and not raw.isdigit():
        raise UserError(f"ONNXQ_THREADS={raw!r} is not a non-negative integer: set e.g. 4, or unset it")
    return int(raw) if raw else 0


def _build_session(src: _Source, level: ort.GraphOptimizationLevel,
                   save_dir: str | None = None) -> tuple[ort.InferenceSession | None, str | None]:
    """An ORT CPU session at ``level``, or None and the error line.

    With ``save_dir``, ORT saves its optimized graph to ``save_dir/optimized.onnx`` (initializers
    over 1 KiB go to an external file, so models of any size serialize).
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = _threads()
    so.log_severity_level = 4  # fatal only: failures reach the report as exceptions
    if save_dir is not None:
        so.optimized_model_filepath = str(Path(save_dir) / "optimized.onnx")
        key = "session.optimized_model_external_initializers_"
        so.add_session_config_entry(key + "file_name", "optimized.data")
        so.add_session_config_entry(key + "min_size_in_bytes", "1024")
    try:
        return ort.InferenceSession(src.ort_input(), so, providers=["CPUExecutionProvider"]), None
    except Exception as exc:  # a broken model is a finding, never a crash
        return None, short_error(exc)


def _saved_counts(save_dir: str) -> dict[str, int]:
    path = Path(save_dir) / "optimized.onnx"
    return count_ops(onnx.load(str(path), load_external_data=False).graph) if path.is_file() else {}


def optimized_op_counts(model: str | Path | onnx.ModelProto,
                        level: ort.GraphOptimizationLevel = _ALL) -> dict[str, int]:
    """op_type -> count in the graph ORT CPU runs after optimizing ``model`` at ``level``.

    ORT writes its optimized graph (``SessionOptions.optimized_model_filepath``) into a temporary
    directory; ORT 1.31 needs no extra config for that (prepacking does not block it). Nodes of
    every domain (``com.microsoft`` fused kernels included) and of subgraphs are counted.

    Raises:
        RuntimeError: ORT could not build a session for the model.
    """
    src = _Source.of(model, "model")
    with tempfile.TemporaryDirectory(prefix="onnxq-opt-") as tmp:
        sess, err = _build_session(src, level, tmp)
        if sess is None:
            raise RuntimeError(f"onnxruntime could not build a CPU session: {err}")
        return _saved_counts(tmp)


class _Runner:
    """One ORT session that records one error line and stops at its first failure."""

    def __init__(self, label: str, src: _Source, level: ort.GraphOptimizationLevel, errors: list[str],
                 save_dir: str | None = None) -> None:
        self.label, self.errors = label, errors
        self.sess, err = _build_session(src, level, save_dir)
        if err is not None:
            errors.append(f"{label}: session build failed: {err}")
        self.ok = self.sess is not None
        self.names = [o.name for o in self.sess.get_outputs()] if self.sess is not None else []
        self.inputs = {i.name for i in self.sess.get_inputs()} if self.sess is not None else set()

    def run(self, feed: Mapping[str, np.ndarray], i: int) -> dict[str, np.ndarray] | None:
        if not self.ok or self.sess is None:
            return None
        try:
            outs = self.sess.run(None, {k: v for k, v in feed.items() if k in self.inputs})
        except Exception as exc:  # any failure inside ORT is a finding, not a crash
            self.errors.append(f"{self.label}: run failed on sample {i}: {short_error(exc)}")
            self.ok = False
            return None
        return {n: np.asarray(o) for n, o in zip(self.names, outs)}


# ---------------------------------------------------------------------------------------------- feeds

_ORT_NP = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _collect_feeds(feeds: Iterable[Mapping[str, np.ndarray]],
                   max_samples: int | None) -> list[dict[str, np.ndarray]]:
    """Materialize at most ``max_samples`` feed dicts (the iterable is read once, no further)."""
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise UserError(f"max_samples must be a positive int or None, got {max_samples!r}")
    if isinstance(feeds, Mapping) or not isinstance(feeds, Iterable):
        raise UserError("feeds must be an iterable of dicts {input name: array}: wrap one feed as [feed]")
    out: list[dict[str, np.ndarray]] = []
    for i, feed in enumerate(itertools.islice(feeds, max_samples)):
        if not isinstance(feed, Mapping):
            raise UserError(f"feed {i} is a {type(feed).__name__}, not a dict {{input name: array}}")
        out.append({str(k): np.asarray(v) for k, v in feed.items()})
    if not out:
        raise UserError("feeds is empty: pass at least one dict {input name: array} with a batch dimension")
    return out


def _check_feeds(feeds: list[dict[str, np.ndarray]], sess: ort.InferenceSession) -> None:
    """Every feed must provide each input of the (float) session, with its element type."""
    names = [x.name for x in sess.get_inputs()]
    for i, feed in enumerate(feeds):
        for inp in sess.get_inputs():
            if inp.name not in feed:
                raise UserError(f"feed {i} lacks input {inp.name!r} (model inputs: {names}): add it")
            want = _ORT_NP.get(inp.type)
            if want is not None and feed[inp.name].dtype != want:
                raise UserError(f"feed {i} input {inp.name!r} is {feed[inp.name].dtype} but the model wants "
                                f"{np.dtype(want)}: cast it with .astype(np.{np.dtype(want).name})")


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


def _checker(src: _Source) -> str | None:
    """The full ONNX checker (path variant for files, so models over 2 GB work): the error or None."""
    try:
        onnx.checker.check_model(str(src.path) if src.path is not None else src.proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, protobuf decode errors ...
        return short_error(exc)
    return None


def _constants(src: _Source, errors: list[str]) -> dict[str, Any]:
    """:func:`check_qdq_constants` of the model; failures and bad scales become error lines."""
    try:
        constants = check_qdq_constants(src.load())
    except Exception as exc:  # unreadable file: the session builds report it as well
        errors.append(f"check_qdq_constants: {short_error(exc)}")
        return {}
    if not constants["scales_ok"]:
        errors.append(f"DequantizeLinear scales not positive and finite: {constants['bad_scales']}")
    return constants


def _ternary(src: _Source, errors: list[str]) -> dict[str, Any] | None:
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
) -> ValidationReport:
    """Validate ``quant_model`` against ``float_model`` in onnxruntime on CPU.

    Args:
        float_model: the float reference (path or ModelProto).
        quant_model: the quantized QDQ model (path or ModelProto; pass a path for models over 2 GB).
        feeds: dicts ``{input name: array}``, each with a batch dimension (int64 token ids are fine).
            Outputs are concatenated over feeds on axis 0; outputs whose non-batch shape varies
            between feeds are flattened per feed first.
        max_samples: use at most this many feed dicts (None: all); ``n_samples`` counts feed dicts.

    Returns:
        A :class:`ValidationReport`; the module docstring says what each field measures.

    Raises:
        UserError: empty or malformed feeds, feeds lacking an input of the float model or of the
            wrong dtype, a missing file, a ModelProto over 2 GB, a bad ``$ONNXQ_THREADS``.
    """
    fsrc, qsrc = _Source.of(float_model, "float_model"), _Source.of(quant_model, "quant_model")
    samples = _collect_feeds(feeds, max_samples)
    _threads()  # fail early on a bad $ONNXQ_THREADS
    errors: list[str] = []
    checker_error = _checker(qsrc)
    if checker_error is not None:
        errors.append(f"checker: {checker_error}")
    constants = _constants(qsrc, errors)
    ternary = _ternary(qsrc, errors)

    fl = _Runner("float model ORT_ENABLE_ALL", fsrc, _ALL, errors)
    if fl.sess is not None:
        _check_feeds(samples, fl.sess)
    with tempfile.TemporaryDirectory(prefix="onnxq-validate-") as tmp:
        qa = _Runner("quant model ORT_ENABLE_ALL", qsrc, _ALL, errors, save_dir=tmp)
        counts = _saved_counts(tmp) if qa.sess is not None else {}
    qn = _Runner("quant model ORT_DISABLE_ALL", qsrc, _NONE, errors)

    ref: dict[str, list[np.ndarray]] = {n: [] for n in fl.names}
    got: dict[str, list[np.ndarray]] = {n: [] for n in qa.names}
    levels_diff = 0.0
    for i, feed in enumerate(samples):
        f_out, a_out, n_out = fl.run(feed, i), qa.run(feed, i), qn.run(feed, i)
        if f_out is not None and a_out is not None:
            for n, v in f_out.items():
                ref[n].append(v)
            for n, v in a_out.items():
                got[n].append(v)
        if a_out is not None and n_out is not None and math.isfinite(levels_diff):
            levels_diff = max(levels_diff, _levels_diff(a_out, n_out, i, errors))

    outputs: list[OutputFidelity] = []
    for fname, qname in _match_outputs(fl.names, qa.names, errors) if fl.ok and qa.ok else []:
        fid = output_fidelity(fname, ref[fname], got[qname])
        if isinstance(fid, str):
            errors.append(fid)
        else:
            outputs.append(fid)
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
    )
