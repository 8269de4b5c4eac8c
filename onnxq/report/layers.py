"""Per-tensor error along depth and calibrated ranges, for the report page.

For every activation tensor ``t`` the quantized model quantizes (the input of a QuantizeLinear that the
float model also computes), both models are run with ``t`` as an extra output (ORT_DISABLE_ALL: the float
function and the QDQ simulation) on the first few validation samples, and, accumulated batch by batch:

* ``sqnr_db = 10 log10(sum t_f^2 / sum (t_q - t_f)^2)`` with ``t_q`` the DequantizeLinear output its readers
  see: the quantized model's error at ``t``, its own rounding and clipping plus what the layers before it
  added (it falls along depth as those errors add up);
* the calibrated range ``[(q_min - z) s, (q_max - z) s]`` of ``t``'s QuantizeLinear (per tensor) and
  ``clipped``, the share of float values outside it;
* ``outlier_ratio = max_c m_c / median_c m_c``, with ``m_c = max |t_f|`` over channel ``c`` (axis 1 of a
  4-D tensor, the last axis otherwise): a few channels far above the rest (a transformer's residual
  stream) are what one per-tensor scale cannot hold; ``outlier`` marks a ratio over :data:`OUTLIER_RATIO`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.core import mapped
from onnxq.report.sessions import DISABLE_ALL, inputs_for, open_session

log = logging.getLogger(__name__)

#: A tensor whose largest channel magnitude is over this many times its median channel's is an outlier tensor.
OUTLIER_RATIO = 8.0
#: Samples the per-tensor errors are measured on (the first validation batches up to this many).
LAYER_SAMPLES = 8


@dataclass
class _Stats:
    signal: float = 0.0
    noise: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    outside: int = 0
    count: int = 0
    channel_max: np.ndarray | None = None


def quantized_activations(quant: onnx.ModelProto,
                          float_names: set[str]) -> list[tuple[str, str, tuple[float, float]]]:
    """(tensor, its dequantized tensor, calibrated range) of each per-tensor activation ``Q -> [Clip] -> DQ``
    of ``quant`` whose input the float model computes, in graph order."""
    consts = {i.name: i for i in quant.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in quant.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    out, seen = [], set()
    for node in quant.graph.node:
        t = node.input[0] if node.input else ""
        if node.op_type != "QuantizeLinear" or t not in float_names or t in seen or node.input[1] not in consts:
            continue
        scale = mapped.values(consts[node.input[1]]).astype(np.float64)
        zp_t = consts.get(node.input[2]) if len(node.input) > 2 else None
        zp = mapped.values(zp_t) if zp_t is not None else np.zeros((), np.uint8)
        if scale.size != 1:
            continue
        info = np.iinfo(zp.dtype) if zp.dtype.kind in "iu" else None
        if info is None:
            continue
        dq = _dequantized(node.output[0], readers)
        if dq is None:
            continue
        s, z = float(scale.reshape(())), float(zp.reshape(()))
        out.append((t, dq, ((info.min - z) * s, (info.max - z) * s)))
        seen.add(t)
    return out


def _dequantized(codes: str, readers: dict[str, list[onnx.NodeProto]]) -> str | None:
    """The output of the DequantizeLinear that reads ``codes`` (through Clips), or None."""
    for node in readers.get(codes, []):
        if node.op_type == "Clip":
            found = _dequantized(node.output[0], readers)
            if found is not None:
                return found
        elif node.op_type == "DequantizeLinear":
            return node.output[0]
    return None


def layer_errors(float_model: onnx.ModelProto, quant: onnx.ModelProto,
                 feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """One record per quantized activation tensor, in graph order, over ``feeds`` (module docstring; the
    caller passes the first validation batches holding :data:`LAYER_SAMPLES` samples)."""
    float_names = {o for n in float_model.graph.node for o in n.output}
    tensors = quantized_activations(quant, float_names)
    if not tensors:
        return []
    names, deq = [t for t, _, _ in tensors], [d for _, d, _ in tensors]
    fsess, qsess = _session(float_model, names), _session(quant, deq)
    stats = {t: _Stats() for t in names}
    ranges = {t: r for t, _, r in tensors}
    for feed in feeds:
        fouts = fsess.run(names, inputs_for(fsess, feed))
        qouts = qsess.run(deq, inputs_for(qsess, feed))
        for t, f, q in zip(names, fouts, qouts, strict=True):
            _accumulate(stats[t], np.asarray(f, np.float64), np.asarray(q, np.float64), ranges[t])
    return [_record(t, stats[t], ranges[t]) for t in names]


def _session(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=t))
    return open_session(m, DISABLE_ALL)


def _accumulate(s: _Stats, f: np.ndarray, q: np.ndarray, rng: tuple[float, float]) -> None:
    if f.shape != q.shape or f.size == 0:
        return
    s.signal += float(np.sum(f * f))
    s.noise += float(np.sum((q - f) ** 2))
    s.lo, s.hi = min(s.lo, float(f.min())), max(s.hi, float(f.max()))
    s.outside += int(np.count_nonzero((f < rng[0]) | (f > rng[1])))
    s.count += f.size
    axis = 1 if f.ndim == 4 else f.ndim - 1
    if f.ndim >= 2:
        m = np.max(np.abs(np.moveaxis(f, axis, 0)).reshape(f.shape[axis], -1), axis=1)
        s.channel_max = m if s.channel_max is None or s.channel_max.shape != m.shape else np.maximum(s.channel_max, m)


def _record(name: str, s: _Stats, rng: tuple[float, float]) -> dict[str, Any]:
    if s.noise == 0:
        sqnr = None if s.signal == 0 else math.inf
    else:
        sqnr = 10 * math.log10(max(s.signal, 1e-300) / s.noise)
    ratio = None
    if s.channel_max is not None and s.channel_max.size > 1:
        median = float(np.median(s.channel_max))
        ratio = float(np.max(s.channel_max)) / median if median > 0 else None
    return {"tensor": name, "sqnr_db": None if sqnr is None or not math.isfinite(sqnr) else round(sqnr, 3),
            "range": [round(rng[0], 6), round(rng[1], 6)],
            "observed": [round(s.lo, 6), round(s.hi, 6)] if s.count else None,
            "clipped": round(s.outside / s.count, 6) if s.count else None,
            "outlier_ratio": None if ratio is None else round(ratio, 3),
            "outlier": ratio is not None and ratio > OUTLIER_RATIO}
