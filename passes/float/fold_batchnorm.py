"""FoldBatchNormPass: fold inference-mode BatchNormalization into the preceding linear op.

Inference BatchNormalization is a per-channel affine map on axis 1. With ``eps`` the node's epsilon,
for every channel ``c``::

    k_c = gamma_c / sqrt(var_c + eps)          s_c = beta_c - k_c * mean_c
    BN(x)_c = k_c * (x_c - mean_c) + beta_c = k_c * x_c + s_c

**Folding.** When ``x = Op(A, W, b)`` is linear in ``W`` per output channel, scaling the slice of ``W``
that produces output channel ``c`` by ``k_c`` scales that channel, so::

    W'_c = k_c * W_c          b'_c = beta_c + k_c * (b_c - mean_c) = k_c * b_c + s_c

with ``b = 0`` when the op has no bias (a new bias initializer is created). Where channel ``c`` lives:

* Conv, ``W: (C_out, C_in/group, k...)``: ``W[c]`` (axis 0), for any group (depthwise included).
* ConvTranspose, ``W: (C_in, C_out/group, k...)``: output channel ``o = g * (C_out/group) + j``
  reads ``W[g*C_in/group:(g+1)*C_in/group, j]``; with ``W`` viewed as
  ``(group, C_in/group, C_out/group, k...)`` the factor is ``k`` viewed as ``(group, 1, C_out/group, 1...)``.
* Gemm, ``Y = alpha * A' B' + beta * C`` (``Y: (N, M)``, always 2-D): channel ``c`` is column ``c`` of
  ``Y``, so rows of ``B`` are scaled when ``transB=1`` (``B: (M, K)``) and columns when ``transB=0``.
  ``alpha`` and ``beta`` are handled exactly: ``alpha`` stays (it commutes with ``k``), the bias
  becomes ``C' = k * (beta * C) + s`` (broadcast to at least ``(M,)``) and ``beta`` is set to 1.

Folding is refused, the BatchNormalization kept, the reason logged at DEBUG and listed in
``ctx.report["fold_batchnorm"]["refused"]`` when: the producer's output has other consumers (or is
a graph output), the weight or bias is not a constant initializer or is shared with another node,
the BN parameters are not constant or do not have one value per output channel, the weight is not
floating point, or the BN is not in inference mode (``training_mode=1``, ``spatial=0``, or any output
beyond ``Y`` used). New weights and biases get fresh names; no constant is modified in place
(graphsurgeon copies share buffers). Weights must be initializers: run CanonicalizePass first for
models that carry them in Constant nodes.

**Lone BatchNormalization** (its input is not produced by Conv/ConvTranspose/Gemm): with
``lone_bn="decompose"`` (default) it becomes ``Y = Add(Mul(X, k), s)`` with ``k`` and ``s`` shaped
``(C, 1, ..., 1)`` (rank(X) - 1 dims), which broadcasts on axis 1: function-preserving. This needs the
rank of ``X`` (from ``X`` or ``Y``); when both are unknown the node is refused (run shape inference
first). ``lone_bn="keep"`` leaves it as it is.

**Statistics for DFQ.** Each fold records ``ctx.bn_stats[y] = (beta, gamma)`` for the folded op's new
output ``y`` (the BN's output name): on the data the BN was trained on, channel ``c`` of ``y`` is
roughly ``N(beta_c, gamma_c^2)``. Bias absorption and data-free bias correction read it; passes that
rescale or shift that output (cross-layer equalization, bias absorption) keep it up to date.

The whole pass is skipped when ``ctx.config.float_phase.fold_batchnorm`` is False. Report:
``ctx.report["fold_batchnorm"] = {"folded": n, "decomposed": n, "refused": [{"node", "reason"}]}``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames, constant, is_graph_output
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.errors import UserError

log = logging.getLogger(__name__)

LONE_BN_MODES = ("decompose", "keep")
FOLDABLE_PRODUCERS = ("Conv", "ConvTranspose", "Gemm")


class _Refused(Exception):
    """Internal: this BatchNormalization cannot be rewritten (message = reason)."""


class FoldBatchNormPass(Pass):
    """Fold BatchNormalization into Conv/ConvTranspose/Gemm; decompose lone ones into Mul + Add.

    Args:
        lone_bn: what to do with a BatchNormalization that has no foldable producer:
            "decompose" (Mul + Add) or "keep".
    """

    def __init__(self, *, lone_bn: str = "decompose"):
        if lone_bn not in LONE_BN_MODES:
            raise UserError(f"lone_bn={lone_bn!r} is not supported: choose one of {', '.join(LONE_BN_MODES)}")
        self.lone_bn = lone_bn

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        report = ctx.report.setdefault("fold_batchnorm", {"folded": 0, "decomposed": 0, "refused": []})
        if not ctx.config.float_phase.fold_batchnorm:
            report["skipped"] = True
            log.debug("fold_batchnorm disabled in the config: pass skipped")
            return PassResult(graph, modified=False)
        names = FreshNames(graph)
        modified = False
        for bn in list(graph.nodes):
            if bn.op != "BatchNormalization" or bn.domain not in (None, "", "ai.onnx") or not bn.outputs:
                continue
            try:
                kind = self._rewrite(graph, bn, names, ctx.bn_stats)
            except _Refused as exc:
                reason = str(exc)
                log.debug("BatchNormalization %s not folded: %s", bn.name, reason)
                entry = {"node": bn.name, "reason": reason}
                if entry not in report["refused"]:
                    report["refused"].append(entry)
                continue
            if kind is not None:
                report[kind] += 1
                modified = True
        return PassResult(graph, modified=modified)

    def _rewrite(self, graph: gs.Graph, bn: gs.Node, names: FreshNames,
                 bn_stats: dict[str, tuple[np.ndarray, np.ndarray]]) -> str | None:
        """Fold or decompose ``bn``; returns "folded", "decomposed" or None (kept), raises _Refused."""
        k, s = _bn_affine(graph, bn)
        x = bn.inputs[0]
        prod = x.inputs[0] if x.inputs else None
        if prod is not None and prod.op in FOLDABLE_PRODUCERS and prod.domain in (None, "", "ai.onnx"):
            gamma, beta = (np.asarray(t.values, dtype=np.float64).reshape(-1).copy() for t in bn.inputs[1:3])
            x_name, y_name = x.name, bn.outputs[0].name
            _fold_into(graph, bn, prod, k, s, names)
            bn_stats.pop(x_name, None)  # a BN folded earlier into the same op no longer describes its output
            bn_stats[y_name] = (beta, gamma)
            return "folded"
        if self.lone_bn == "keep":
            return None
        _decompose(graph, bn, k, s, names)
        return "decomposed"


# ---------------------------------------------------------------------- BN parameters
def _bn_affine(graph: gs.Graph, bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(k, s) in float64, both 1-D of length C, or raise _Refused."""
    if int(bn.attrs.get("training_mode", 0)) != 0:
        raise _Refused("training_mode=1")
    if int(bn.attrs.get("spatial", 1)) == 0:
        raise _Refused("spatial=0 (per-location statistics)")
    for extra in bn.outputs[1:]:
        if not extra.is_empty() and (extra.outputs or is_graph_output(graph, extra)):
            raise _Refused(f"training output {extra.name} is used")
    if len(bn.inputs) != 5 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:]):
        raise _Refused("BatchNormalization parameters are not constant")
    gamma, beta, mean, var = (np.asarray(t.values, dtype=np.float64).reshape(-1) for t in bn.inputs[1:])
    if not gamma.size == beta.size == mean.size == var.size:
        raise _Refused("BatchNormalization parameters differ in length")
    eps = float(bn.attrs.get("epsilon", 1e-5))
    k = gamma / np.sqrt(var + eps)
    return k, beta - k * mean


# ---------------------------------------------------------------------- folding
def _fold_into(graph: gs.Graph, bn: gs.Node, prod: gs.Node, k: np.ndarray, s: np.ndarray,
               names: FreshNames) -> None:
    x = bn.inputs[0]
    if len(x.outputs) != 1 or is_graph_output(graph, x):
        raise _Refused(f"{prod.op} output {x.name} has other consumers than the BatchNormalization")
    if len(prod.inputs) < 2 or not isinstance(prod.inputs[1], gs.Constant):
        raise _Refused(f"{prod.op} weight is not constant")
    w_t = prod.inputs[1]
    if len(w_t.outputs) != 1:
        raise _Refused(f"{prod.op} weight {w_t.name} is shared with another node")
    b_t = prod.inputs[2] if len(prod.inputs) > 2 and not prod.inputs[2].is_empty() else None
    if b_t is not None and not isinstance(b_t, gs.Constant):
        raise _Refused(f"{prod.op} bias is not constant")
    if b_t is not None and len(b_t.outputs) != 1:
        raise _Refused(f"{prod.op} bias {b_t.name} is shared with another node")
    w = np.asarray(w_t.values)
    if not np.issubdtype(w.dtype, np.floating):
        raise _Refused(f"{prod.op} weight has dtype {w.dtype}, not float")
    b = None if b_t is None else np.asarray(b_t.values, dtype=np.float64)

    if prod.op == "Gemm":
        new_w, new_b = _fold_gemm(prod, x, w, b, k, s)
    else:
        new_w, new_b = _fold_conv(prod, w, b, k, s)

    prod.inputs[1] = constant(names.fresh(f"{w_t.name}_bnfold"), new_w.astype(w.dtype))
    base = b_t.name if b_t is not None else f"{prod.name or prod.op}_bias"
    bias_name = names.fresh(f"{base}_bnfold")
    new_b_t = constant(bias_name, new_b.astype(w.dtype))
    if len(prod.inputs) > 2:
        prod.inputs[2] = new_b_t
    else:
        prod.inputs.append(new_b_t)
    y = bn.outputs[0]
    bn.outputs.clear()
    bn.inputs.clear()
    prod.outputs[0] = y  # the BN output name (maybe a graph output) is kept


def _fold_conv(prod: gs.Node, w: np.ndarray, b: np.ndarray | None, k: np.ndarray,
               s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    group = int(prod.attrs.get("group", 1))
    if w.ndim < 2:
        raise _Refused(f"{prod.op} weight has rank {w.ndim}")
    c_out = w.shape[0] if prod.op == "Conv" else w.shape[1] * group
    _check_channels(prod, k, c_out)
    w64 = w.astype(np.float64)
    if prod.op == "Conv":
        new_w = w64 * k.reshape((c_out,) + (1,) * (w.ndim - 1))
    else:
        if w.shape[0] % group:
            raise _Refused(f"ConvTranspose weight dim 0 ({w.shape[0]}) is not divisible by group={group}")
        view = w64.reshape((group, w.shape[0] // group, w.shape[1]) + w.shape[2:])
        factor = k.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        new_w = (view * factor).reshape(w.shape)
    bias = np.zeros(c_out) if b is None else b.reshape(-1)
    if bias.size != c_out:
        raise _Refused(f"{prod.op} bias has {bias.size} values for {c_out} output channels")
    return new_w, k * bias + s


def _fold_gemm(prod: gs.Node, x: gs.Tensor, w: np.ndarray, b: np.ndarray | None, k: np.ndarray,
               s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if x.shape is not None and len(x.shape) != 2:
        raise _Refused(f"Gemm output has rank {len(x.shape)}, not 2")
    if w.ndim != 2:
        raise _Refused(f"Gemm B has rank {w.ndim}")
    trans_b = int(prod.attrs.get("transB", 0))
    m = w.shape[0] if trans_b else w.shape[1]
    _check_channels(prod, k, m)
    w64 = w.astype(np.float64)
    new_w = w64 * k[:, None] if trans_b else w64 * k[None, :]
    if b is None:
        new_b = s.copy()
    else:
        beta = float(prod.attrs.get("beta", 1.0))
        new_b = k * (beta * b) + s  # broadcasts C (scalar, (M,), (1, M), (N, 1), (N, M)) against (M,)
        prod.attrs["beta"] = 1.0
    return new_w, new_b


def _check_channels(prod: gs.Node, k: np.ndarray, c_out: int) -> None:
    if k.size != c_out:
        raise _Refused(f"BatchNormalization has {k.size} channels but {prod.op} has {c_out} outputs")


# ---------------------------------------------------------------------- lone BN
def _decompose(graph: gs.Graph, bn: gs.Node, k: np.ndarray, s: np.ndarray, names: FreshNames) -> None:
    x, y = bn.inputs[0], bn.outputs[0]
    known = x.shape if x.shape is not None else y.shape  # Y has the shape of X
    if known is None:
        raise _Refused("lone BatchNormalization with an input of unknown rank (run shape inference first)")
    rank = len(known)
    if rank < 2:
        raise _Refused(f"lone BatchNormalization with a rank-{rank} input")
    known_dtype = x.dtype if x.dtype is not None else y.dtype
    dtype = np.dtype(known_dtype) if known_dtype is not None else np.asarray(bn.inputs[1].values).dtype
    shape = (k.size,) + (1,) * (rank - 2)
    base = bn.name or "BatchNormalization"
    scale = constant(names.fresh(f"{base}_scale"), k.reshape(shape).astype(dtype))
    shift = constant(names.fresh(f"{base}_shift"), s.reshape(shape).astype(dtype))
    mid = gs.Variable(names.fresh(f"{base}_scaled"), dtype=dtype, shape=known)
    bn.outputs.clear()
    bn.inputs.clear()
    mul = gs.Node("Mul", name=names.fresh(f"{base}_mul"), inputs=[x, scale], outputs=[mid])
    add = gs.Node("Add", name=names.fresh(f"{base}_add"), inputs=[mid, shift], outputs=[y])
    graph.nodes.extend([mul, add])


