"""Numeric fidelity metrics, per-output aggregation and checks of DequantizeLinear constants.

Pure numpy (plus ``onnx`` for reading initializers); no onnxruntime. Used by :mod:`onnxq.report.validate`.

Metrics compare a reference array ``r`` (float model) with a test array ``t`` (quantized model),
both read as float64 and flattened, with error ``e = r - t``:

* SQNR:   ``10 * log10(sum(r**2) / sum(e**2))`` dB (``inf`` when ``e == 0``).
* cosine: ``<r, t> / (|r| * |t|)``.
* max abs error: ``max |e|``.
* top-1 agreement: ``mean(argmax_c r[n, c] == argmax_c t[n, c])`` for classifier-shaped outputs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxq.core import mapped
from onnxq.core.weight_cast import folded_constants
from onnxq.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "FLOAT_COMPUTE_OPS", "INTEGER_KERNELS", "OutputFidelity", "check_qdq_constants", "classify_ops",
    "cosine", "count_ops", "is_power_of_two", "json_num", "jsonable", "max_abs_err", "output_fidelity",
    "sqnr_db", "stack_samples", "top1_agreement",
]

#: Integer (or quantized-weight) kernels ORT fuses QDQ patterns into; any ``QLinear*`` op counts too.
INTEGER_KERNELS = frozenset({
    "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
    "MatMulInteger16", "QAttention", "DynamicQuantizeLSTM", "QEmbedLayerNormalization", "MatMulNBits",
    "QOrderedMatMul", "QOrderedAttention", "QOrderedLayerNormalization", "QOrderedGelu",
})
#: Heavy compute ops that, when left after optimization, run in float.
FLOAT_COMPUTE_OPS = frozenset({
    "Conv", "FusedConv", "NchwcConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
    "Einsum", "Attention", "MultiHeadAttention", "GroupQueryAttention", "LSTM", "GRU", "RNN",
})
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

_MAX_LISTED = 20  # check_qdq_constants lists at most this many offending nodes


def _pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as flat float64, after checking that their shapes agree."""
    r = np.asarray(ref)
    t = np.asarray(test)
    if r.shape != t.shape:
        raise UserError(f"cannot compare arrays of shapes {r.shape} and {t.shape}: pass equal shapes")
    return r.astype(np.float64, copy=False).ravel(), t.astype(np.float64, copy=False).ravel()


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``ref`` in dB.

    ``SQNR = 10 * log10(sum(ref**2) / sum((ref - test)**2))``. Returns ``inf`` when the arrays are
    equal (zero noise, empty arrays included) and ``-inf`` when ``ref`` is all zeros but ``test``
    is not. NaNs in either array give NaN.
    """
    r, t = _pair(ref, test)
    noise = float(np.sum((r - t) ** 2))
    signal = float(np.sum(r**2))
    if np.isnan(noise) or np.isnan(signal):
        return float("nan")
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def cosine(ref: np.ndarray, test: np.ndarray) -> float:
    """Cosine similarity ``<ref, test> / (|ref| * |test|)`` of the flattened arrays.

    Two all-zero arrays count as identical (1.0); one all-zero array against a non-zero one gives 0.0.
    """
    r, t = _pair(ref, test)
    nr = float(np.linalg.norm(r))
    nt = float(np.linalg.norm(t))
    if nr == 0.0 and nt == 0.0:
        return 1.0
    if nr == 0.0 or nt == 0.0:
        return 0.0
    return float(np.dot(r, t) / (nr * nt))


def max_abs_err(ref: np.ndarray, test: np.ndarray) -> float:
    """``max |ref - test|`` over all elements (0.0 for empty arrays)."""
    r, t = _pair(ref, test)
    if r.size == 0:
        return 0.0
    return float(np.max(np.abs(r - t)))


def top1_agreement(ref: np.ndarray, test: np.ndarray) -> float | None:
    """Fraction of rows whose arg-max class agrees: ``mean(argmax(ref, 1) == argmax(test, 1))``.

    Defined only for classifier-shaped outputs ``[N, C]`` or ``[N, C, 1, 1]`` with ``C > 1`` and
    ``N > 0``; returns None for any other shape.
    """
    r, t = np.asarray(ref), np.asarray(test)
    if r.shape != t.shape:
        raise UserError(f"cannot compare arrays of shapes {r.shape} and {t.shape}: pass equal shapes")
    if r.ndim == 4 and r.shape[2:] == (1, 1):
        r, t = r[:, :, 0, 0], t[:, :, 0, 0]
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] < 2:
        return None
    return float(np.mean(np.argmax(r, axis=1) == np.argmax(t, axis=1)))


def majority_share(ref: np.ndarray) -> float | None:
    """Share of rows whose float arg-max is the most common class: the top-1 agreement a constant
    prediction would reach (None where :func:`top1_agreement` is undefined)."""
    r = np.asarray(ref)
    if r.ndim == 4 and r.shape[2:] == (1, 1):
        r = r[:, :, 0, 0]
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] < 2:
        return None
    return float(np.bincount(np.argmax(r, axis=1)).max() / r.shape[0])


def is_power_of_two(a: np.ndarray) -> np.ndarray:
    """Element-wise test ``a == 2**k`` for an integer ``k`` (negative ``k`` included).

    ``np.frexp`` writes ``a = m * 2**e`` with ``0.5 <= |m| < 1``; ``a`` is a positive power of two
    exactly when ``m == 0.5``. Zero, negatives, inf and NaN give False. Works for float16, bfloat16
    and float8 inputs as well (they are widened to float64 first, which is exact).
    """
    x = np.asarray(a).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mantissa, _ = np.frexp(x)
        return np.asarray((mantissa == 0.5) & np.isfinite(x), dtype=bool)


def _dtype_name(data_type: int) -> str:
    """ONNX data type as a short lower-case name (``int8``, ``uint4``, ``float8e4m3fn`` ...)."""
    try:
        return onnx.TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"type{data_type}"


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers plus the ``value`` tensors of Constant nodes, by output name; an integer Cast of a
    constant (``onnxq.core.weight_cast``) counts as the constant it folds to."""
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.HasField("t"):
                    consts[node.output[0]] = attr.t
    for out, (value, _) in folded_constants(graph).items():
        consts[out] = numpy_helper.from_array(value, out)
    return consts


def _to_array(tensor: onnx.TensorProto) -> np.ndarray | None:
    """``numpy_helper.to_array`` that returns None (and logs) when the data cannot be read."""
    try:
        return mapped.values(tensor)
    except Exception as exc:  # external data not loaded, unknown type, corrupt buffer
        logger.debug("cannot read constant %r: %s", tensor.name, exc)
        return None


def _value_range(x: np.ndarray) -> tuple[int | float, int | float]:
    """``(min, max)`` of the stored values, as ints when they are integral."""
    lo, hi = float(x.astype(np.float64).min()), float(x.astype(np.float64).max())
    return (int(lo) if lo.is_integer() else lo), (int(hi) if hi.is_integer() else hi)


def _inspect_dq(node: onnx.NodeProto, label: str, consts: Mapping[str, onnx.TensorProto],
                out: dict[str, Any]) -> None:
    """Add one DequantizeLinear with a constant ``x`` to the tallies in ``out``."""
    x_tensor = consts[node.input[0]]
    dname = _dtype_name(x_tensor.data_type)
    out["dtypes"][dname] = out["dtypes"].get(dname, 0) + 1
    out["int32_bias"] += int(x_tensor.data_type == onnx.TensorProto.INT32)
    x = _to_array(x_tensor)
    if x is None:
        out["unreadable"].append(label)
    elif x.size:
        lo, hi = _value_range(x)
        old = out["value_range"].get(dname, [lo, hi])
        out["value_range"][dname] = [min(old[0], lo), max(old[1], hi)]
    scale_name = node.input[1] if len(node.input) > 1 else ""
    s = _to_array(consts[scale_name]) if scale_name in consts else None
    if scale_name not in consts:
        out["non_const_scale"] += 1
    elif s is None:
        out["unreadable"].append(label)
    else:
        s64 = np.asarray(s).astype(np.float64)
        if not bool(np.all(np.isfinite(s64) & (s64 > 0))):
            out["scales_ok"] = False
            out["bad_scales"].append(label)
        out["pow2_scales"] += int(s64.size > 0 and bool(np.all(is_power_of_two(s64))))
    zp_name = node.input[2] if len(node.input) > 2 else ""
    zp = _to_array(consts[zp_name]) if zp_name in consts else None
    if not zp_name or (zp is not None and not np.any(np.asarray(zp).astype(np.float64))):
        out["zero_point_zero"] += 1


def check_qdq_constants(model: onnx.ModelProto) -> dict[str, Any]:
    """Inspect every DequantizeLinear whose ``x`` input is a constant (initializer or Constant node).

    For each such node the storage type is tallied, the scale ``s`` must satisfy ``0 < s < inf``,
    and the scale is tested for being an exact power of two (:func:`is_power_of_two`). Only the
    main graph is inspected.

    Args:
        model: the quantized model (with its external data loaded, if any).

    Returns:
        A JSON-able dict:
        ``n_dq`` (all DequantizeLinear nodes), ``n_const_dq`` (those with a constant ``x``),
        ``dtypes`` (storage type name -> count), ``value_range`` (type -> ``[min, max]`` of the stored
        values), ``scales_ok`` (all constant scales positive and finite), ``bad_scales`` (names of
        DQ nodes whose scales are not, at most 20), ``pow2_scales`` (DQ whose scales are all exact
        powers of two), ``zero_point_zero`` (DQ whose zero point is absent or all zero),
        ``int32_bias`` (DQ with int32 storage), ``non_const_scale`` (DQ whose scale is computed) and
        ``unreadable`` (DQ whose constants could not be read, e.g. external data not loaded; at most 20).
    """
    if not isinstance(model, onnx.ModelProto):
        raise UserError(f"check_qdq_constants wants an onnx.ModelProto, got {type(model).__name__}: "
                        "load the file with onnx.load")
    consts = _constants(model.graph)
    out: dict[str, Any] = {
        "n_dq": 0, "n_const_dq": 0, "dtypes": {}, "value_range": {}, "scales_ok": True, "bad_scales": [],
        "pow2_scales": 0, "zero_point_zero": 0, "int32_bias": 0, "non_const_scale": 0, "unreadable": [],
    }
    for idx, node in enumerate(model.graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        out["n_dq"] += 1
        if node.input and node.input[0] in consts:
            out["n_const_dq"] += 1
            _inspect_dq(node, node.name or f"DequantizeLinear#{idx}({node.input[0]})", consts, out)
    for key in ("dtypes", "value_range"):
        out[key] = dict(sorted(out[key].items()))
    for key in ("bad_scales", "unreadable"):
        out[key] = out[key][:_MAX_LISTED]
    return out


# ------------------------------------------------------------------------------------------ op counts


def count_ops(graph: onnx.GraphProto) -> dict[str, int]:
    """op_type -> number of nodes in ``graph`` and its subgraphs (If/Loop/Scan bodies), any domain."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                for k, v in count_ops(sub).items():
                    counts[k] = counts.get(k, 0) + v
    return dict(sorted(counts.items()))


def classify_ops(counts: Mapping[str, int]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Split op counts into (integer kernels, float compute ops, Q/DQ nodes)."""
    ints = {k: v for k, v in counts.items() if k in INTEGER_KERNELS or k.startswith("QLinear")}
    flts = {k: v for k, v in counts.items() if k in FLOAT_COMPUTE_OPS}
    qdq = {k: v for k, v in counts.items() if k in QDQ_OPS}
    return dict(sorted(ints.items())), dict(sorted(flts.items())), dict(sorted(qdq.items()))


# ------------------------------------------------------------------------------------ per-output records


def json_num(x: float | None, digits: int) -> float | str | None:
    """A float for JSON: ``digits`` significant digits, inf as ``"inf"``/``"-inf"``, NaN/None as None."""
    if x is None or math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(f"{x:.{digits}g}")


def jsonable(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays, tuples and non-finite floats into JSON-safe values."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return json_num(float(obj), 10)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


@dataclass(frozen=True)
class OutputFidelity:
    """Fidelity of one model output, quantized against float, over all samples."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_err: float
    top1_agreement: float | None
    rows: int = 0  # the rows top1_agreement counted (0: no class axis)
    majority: float | None = None  # majority_share of the float outputs: what a constant prediction agrees

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (SQNR to 0.001 dB, cosine to 8 significant digits)."""
        finite = math.isfinite(self.sqnr_db)
        return {
            "name": self.name,
            "sqnr_db": round(self.sqnr_db, 3) if finite else json_num(self.sqnr_db, 3),
            "cosine": json_num(self.cosine, 8),
            "max_abs_err": json_num(self.max_abs_err, 6),
            "top1_agreement": json_num(self.top1_agreement, 6),
            "rows": self.rows,
            "majority": json_num(self.majority, 6),
        }


def level_gap(ref: list[np.ndarray], simulated: list[np.ndarray], fused: list[np.ndarray]) -> float:
    """``||fused - simulated||^2 / ||simulated - ref||^2`` over the samples whose shapes agree: the error the
    fused kernels add, as a fraction of quantization's own (0 when they match; inf when quantization is
    exact but the kernels are not)."""
    keep = [i for i in range(min(len(ref), len(simulated), len(fused)))
            if ref[i].shape == simulated[i].shape == fused[i].shape]
    if not keep:
        return math.nan
    r, s, f = (stack_samples([x[i].astype(np.float64) for i in keep]) for x in (ref, simulated, fused))
    added, own = float(np.sum((f - s) ** 2)), float(np.sum((s - r) ** 2))
    if own == 0:
        return 0.0 if added == 0 else math.inf
    return added / own


def stack_samples(arrays: list[np.ndarray]) -> np.ndarray:
    """Concatenate per-sample arrays on axis 0; if their non-batch shapes vary, flatten each first."""
    if all(a.ndim >= 1 and a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return np.concatenate(arrays, axis=0)
    return np.concatenate([a.ravel() for a in arrays])


def output_fidelity(name: str, refs: list[np.ndarray], tests: list[np.ndarray]) -> OutputFidelity | str:
    """Metrics of one output over all samples, or a one-line reason why there are none.

    Samples whose float and quantized shapes differ (e.g. a detector keeping a different number of
    boxes) are left out with a warning; the remaining samples are stacked by :func:`stack_samples`
    in float64 and compared as one array.
    """
    pairs = [(r, t) for r, t in zip(refs, tests) if r.shape == t.shape]
    if not refs or not tests:
        return f"output {name!r}: no samples to compare"
    if any(a.dtype.kind not in "biuf" for a in refs[:1] + tests[:1]):
        return f"output {name!r}: dtype {refs[0].dtype} / {tests[0].dtype} is not numeric, cannot compare"
    if not pairs:
        return (f"output {name!r}: quant and float shapes differ on every sample, "
                f"e.g. {tests[0].shape} vs {refs[0].shape}")
    if len(pairs) < len(refs):
        logger.warning("output %r: %d of %d samples differ in shape between float and quant; left out",
                       name, len(refs) - len(pairs), len(refs))
    ref = stack_samples([r.astype(np.float64) for r, _ in pairs])
    test = stack_samples([t.astype(np.float64) for _, t in pairs])
    top1 = top1_agreement(ref, test)
    return OutputFidelity(name, sqnr_db(ref, test), cosine(ref, test), max_abs_err(ref, test), top1,
                          ref.shape[0] if top1 is not None else 0, majority_share(ref))
