"""SmoothActivationsPass: migrate activation outliers into the weights of the MatMuls they feed.

SmoothQuant (Xiao et al., 2023). A few channels of a transformer's activations (LayerNorm outputs,
GELU outputs) are tens of times larger than the rest, so one per-tensor activation scale leaves the
other channels a handful of levels. For ``Y = X W`` (``X: [..., K]``, ``W: [K, N]``) and any positive
per-channel factor ``s`` (length K)::

    Y = (X diag(s)^-1) (diag(s) W)

exactly in real arithmetic: dividing channel k of the activation by ``s_k`` and multiplying row k of
the weight by ``s_k`` moves range from the activation (per-tensor grid) to the weight (per-output-
channel grid, where a larger row costs little). The paper's factor, with ``a_k = max |X_k|`` over the
calibration data and ``w_k = max_n |W_kn|`` over every weight fed by ``X``::

    s_k = a_k^alpha / w_k^(1 - alpha)

**Choice of alpha (searched, per tensor).** For each tensor the candidates ``alpha`` in
{0.3, 0.4, ..., 0.8} and "no smoothing" (``s = 1``) are scored by the relative output error of the
quantized product on calibration rows, ``||Q_a(X / s) Q_w(s W) - X W||^2 / ||X W||^2``, with ``Q_a`` the
activations' per-tensor asymmetric grid (min/max) and ``Q_w`` symmetric per-output-channel weights
(min/max) of the configured widths; the lowest wins, so the proxy never gets worse than no smoothing.
A fixed ``alpha`` (the paper's 0.5 for most models) skips the search.

**Where 1/s goes.** If ``X`` is the output of a ``LayerNormalization`` over the last axis whose every
consumer is in the group, ``gamma <- gamma / s`` and ``beta <- beta / s`` (no new op). Otherwise a
``Mul(X, 1/s)`` is inserted in front of the group's MatMuls only, so other consumers (a residual
``Add``) still read ``X``. Consumers: ``MatMul(X, W)`` with a constant 2-D ``W`` and ``Gemm`` with
``transA = 0`` (``W = B^T`` when ``transB = 1``). Weights are written as new initializers (a weight
shared with another op keeps its old values there).

Exact in float up to rounding (``x / s`` then ``s w``): the tests compare outputs to 1e-5 relative.
Reads ``ctx.calib`` (without it, e.g. in ``onnxq inspect``, nothing changes); writes
``ctx.report["smooth_activations"] = {"alpha", "tensors": [{"tensor", "consumers", "alpha", "folded_into",
"error_before", "error_after", "max_ratio"}], "skipped": [...]}``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames, const_value, constant, consumers, is_graph_output, producer, to_model
from onnxq.core.observers import weight_qparams
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.spec import INT8_WEIGHT_PC, UINT8_ACT, fake_quantize, qparams_from_range
from onnxq.data.capture import capture
from onnxq.errors import UserError

log = logging.getLogger(__name__)

#: The searched migration strengths (the paper's range; "no smoothing" is always a candidate too).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
#: Calibration rows (tokens) per tensor kept for the alpha search.
SEARCH_ROWS = 1024
#: Factors are kept within [1 / LIMIT, LIMIT] so that no row of a weight or channel of an activation
#: leaves float32's comfortable range.
LIMIT = 1e4


@dataclass
class _Group:
    """The weight MatMuls reading one activation tensor."""

    tensor: gs.Variable
    nodes: list[gs.Node]
    weights: list[np.ndarray]  # each [K, N_i] as the MatMul uses it


class SmoothActivationsPass(Pass):
    """SmoothQuant-style migration of activation outliers into the next weights (module docstring).

    Args:
        alpha: a fixed migration strength in [0, 1], or None to search it per tensor.
        activation_bits: width of the activation grid of the search's error proxy.
        weight_bits: width of the weight grid of the search's error proxy.
    """

    def __init__(self, *, alpha: float | None = None, activation_bits: int = 8, weight_bits: int = 8):
        if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
            raise UserError(f"smoothing alpha={alpha} must be in [0, 1] (or unset to search it)")
        self.alpha = None if alpha is None else float(alpha)
        self.activation_bits, self.weight_bits = int(activation_bits), int(weight_bits)

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        report: dict = {"alpha": "searched" if self.alpha is None else self.alpha, "tensors": [], "skipped": []}
        ctx.report["smooth_activations"] = report
        groups = _groups(graph)
        if not groups:
            return PassResult(graph, modified=False)
        if ctx.calib is None:  # e.g. ``onnxq inspect``: the factors come from data
            log.warning("smooth_activations: no calibration data, %d tensors left as they are", len(groups))
            report["skipped"].append({"tensor": "*", "reason": "no calibration data"})
            return PassResult(graph, modified=False)
        stats = _capture(graph, ctx, [g.tensor.name for g in groups])
        names = FreshNames(graph)
        for g in groups:
            absmax, rows = stats[g.tensor.name]
            choice = self._choose(g, absmax, rows)
            if choice is None:
                report["skipped"].append({"tensor": g.tensor.name, "reason": "no smoothing has the lowest error"})
                continue
            alpha, s, before, after = choice
            folded = _apply(graph, g, s, names)
            report["tensors"].append({"tensor": g.tensor.name, "consumers": [n.name for n in g.nodes],
                                      "alpha": alpha, "folded_into": folded, "error_before": before,
                                      "error_after": after, "max_ratio": float(s.max() / s.min())})
        log.info("smooth_activations: %d of %d tensors smoothed", len(report["tensors"]), len(groups))
        return PassResult(graph, modified=bool(report["tensors"]))

    def _choose(self, g: _Group, absmax: np.ndarray, rows: np.ndarray
                ) -> tuple[float, np.ndarray, float, float] | None:
        w_max = np.max(np.abs(np.concatenate(g.weights, axis=1)), axis=1)
        alphas = ALPHAS if self.alpha is None else (self.alpha,)
        none_error = _error(rows, g.weights, np.ones_like(absmax), self.activation_bits, self.weight_bits)
        best: tuple[float, np.ndarray, float] | None = None
        for alpha in alphas:
            s = factors(absmax, w_max, alpha)
            err = _error(rows, g.weights, s, self.activation_bits, self.weight_bits)
            if best is None or err < best[2]:
                best = (alpha, s, err)
        assert best is not None
        if self.alpha is None and best[2] >= none_error:
            return None
        return best[0], best[1], none_error, best[2]


def factors(a_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``s_k = a_k^alpha / w_k^(1 - alpha)``, 1 where a channel is all zero, within [1/LIMIT, LIMIT]."""
    a = np.asarray(a_max, dtype=np.float64)
    w = np.asarray(w_max, dtype=np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return np.clip(s, 1.0 / LIMIT, LIMIT)


def _error(rows: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, a_bits: int, w_bits: int) -> float:
    """Relative output error ``sum ||Q(X/s) Q(sW) - XW||^2 / sum ||XW||^2`` over the group's weights, with
    ``Q`` the activations' per-tensor asymmetric min/max grid and symmetric per-column min/max weights."""
    x = rows / s
    xq = fake_quantize(x, qparams_from_range(x.min(), x.max(), replace(UINT8_ACT, bits=a_bits)))
    w_spec = replace(INT8_WEIGHT_PC, bits=w_bits).with_axis(1)
    num = den = 0.0
    for w in weights:
        y = rows @ w
        ws = w * s[:, None]
        yq = xq @ fake_quantize(ws, weight_qparams(ws, w_spec))
        num += float(np.sum((yq - y) ** 2))
        den += float(np.sum(y ** 2))
    return num / den if den > 0 else 0.0


def _weight(node: gs.Node) -> np.ndarray | None:
    """The ``[K, N]`` float weight a MatMul/Gemm multiplies its first input by, or None."""
    if len(node.inputs) < 2:
        return None
    w = const_value(node.inputs[1])
    if w is None or w.ndim != 2 or w.dtype.kind != "f":
        return None
    if node.op == "MatMul":
        return w
    if node.op == "Gemm" and not node.attrs.get("transA", 0):
        return w.T if node.attrs.get("transB", 0) else w
    return None


def _groups(graph: gs.Graph) -> list[_Group]:
    out = []
    for t in graph.tensors().values():
        if not isinstance(t, gs.Variable) or t.dtype not in (None, np.float32):
            continue
        nodes, weights = [], []
        for n in consumers(t):
            w = _weight(n) if n.inputs and n.inputs[0] is t else None
            if w is not None and (not weights or w.shape[0] == weights[0].shape[0]):
                nodes.append(n)
                weights.append(w.astype(np.float64))
        if nodes:
            out.append(_Group(t, nodes, weights))
    return out


def _capture(graph: gs.Graph, ctx: QuantContext, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per tensor: the per-channel absolute maximum over all calibration rows and up to SEARCH_ROWS rows."""
    absmax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
    kept = dict.fromkeys(names, 0)

    def update(name: str, value: np.ndarray) -> None:
        flat = np.asarray(value, dtype=np.float64).reshape(-1, value.shape[-1])
        m = np.max(np.abs(flat), axis=0)
        absmax[name] = m if name not in absmax else np.maximum(absmax[name], m)
        if kept[name] < SEARCH_ROWS:
            step = max(1, flat.shape[0] // 256)  # spread the kept rows over each batch
            take = flat[::step][: SEARCH_ROWS - kept[name]]
            rows[name].append(take)
            kept[name] += take.shape[0]

    total = len(ctx.calib) if hasattr(ctx.calib, "__len__") else None
    if capture(to_model(graph), names, ctx.calib, update, total=total, desc="smooth activations") == 0:
        raise UserError("the calibration data is empty: give at least one sample")
    return {n: (absmax[n], np.concatenate(rows[n])) for n in names if n in absmax}


def _apply(graph: gs.Graph, g: _Group, s: np.ndarray, names: FreshNames) -> str:
    """Scale the group's weights by ``s`` and divide ``X`` by it; returns where 1/s went."""
    for node, w in zip(g.nodes, g.weights):
        scaled = (w * s[:, None]).astype(np.float32)
        if node.op == "Gemm" and node.attrs.get("transB", 0):
            scaled = np.ascontiguousarray(scaled.T)
        node.inputs[1] = constant(names.fresh(f"{node.name or 'w'}_smoothed"), scaled)
    ln = producer(g.tensor)
    if ln is not None and _foldable(graph, ln, g):
        for i in (1, 2):
            if len(ln.inputs) > i and ln.inputs[i] is not None and const_value(ln.inputs[i]) is not None:
                v = np.asarray(const_value(ln.inputs[i]), dtype=np.float64) / s
                ln.inputs[i] = constant(names.fresh(f"{ln.name or 'ln'}_smoothed"), v.astype(np.float32))
        return ln.name or ln.op
    inv = constant(names.fresh(f"{g.tensor.name}_smooth_inv"), (1.0 / s).astype(np.float32))
    out = gs.Variable(names.fresh(f"{g.tensor.name}_smoothed"), dtype=np.float32, shape=g.tensor.shape)
    graph.nodes.append(gs.Node("Mul", names.fresh(f"{g.tensor.name}_smooth"), inputs=[g.tensor, inv], outputs=[out]))
    for node in g.nodes:
        node.inputs[0] = out
    return "Mul"


def _foldable(graph: gs.Graph, ln: gs.Node, g: _Group) -> bool:
    """A LayerNormalization over the last axis with constant scale (and bias) whose output only the
    group reads."""
    if ln.op != "LayerNormalization" or len(ln.outputs) < 1 or ln.outputs[0] is not g.tensor:
        return False
    if is_graph_output(graph, g.tensor) or len(consumers(g.tensor)) != len(g.nodes):
        return False
    if any(o is not None and consumers(o) for o in ln.outputs[1:]):
        return False
    rank = len(g.tensor.shape) if g.tensor.shape is not None else None
    axis = int(ln.attrs.get("axis", -1))
    if axis != -1 and (rank is None or axis != rank - 1):
        return False
    if const_value(ln.inputs[1]) is None or (len(ln.inputs) > 2 and const_value(ln.inputs[2]) is None):
        return False
    return True
