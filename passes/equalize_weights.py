"""EqualizeWeightsPass: cross-layer equalization (CLE) of consecutive weighted layers (DFQ, Nagel 2019).

**Pairs.** ``y = L2(f(L1(x)))`` where ``L1`` and ``L2`` are Conv (any group, depthwise included) or Gemm
(``transA = 0``, ``transB`` 0 or 1) and ``f`` is Relu, LeakyRelu, nothing, or a Clip. Every edge of the
path has exactly one consumer and is not a graph output; both weights (and biases) are constant
initializers used by no other node. Conv -> Conv and Gemm -> Gemm are the only shapes that occur.

**Why scaling is exact.** For ``s > 0`` a positively homogeneous ``f`` (Relu, LeakyRelu, identity)
satisfies ``f(h / s) = f(h) / s`` per channel, so dividing output channel ``i`` of ``L1`` by ``s_i`` and
multiplying input channel ``i`` of ``L2`` by ``s_i`` leaves ``y`` unchanged (zero padding of ``L2`` stays
zero). ``Clip(0, m)`` with a finite ``m`` (ReLU6: ``m = 6``) is not homogeneous:
``clip(h / s, 0, m) != clip(h, 0, m) / s``. ``relu6="skip"`` leaves such pairs alone;
``relu6="replace"`` turns the Clip into Relu first (what DFQ did for MobileNetV2), which CHANGES
the float function (a warning is logged and the count reported), then equalizes.

**Scales.** With ``r1_i = max|W1[i, ...]|`` (output channel ``i`` of ``L1``) and ``r2_i`` the largest
``|W2|`` over the weights that read input channel ``i`` of ``L2`` (Conv ``W2[:, i, ...]``; for a grouped
Conv, the rows of channel ``i``'s group at column ``i mod C_in/g``; depthwise: the channel's own
kernel(s)), ``s_i = sqrt(r1_i / r2_i)`` and::

    W1[i] <- W1[i] / s_i      b1[i] <- b1[i] / s_i      W2[:, i] <- W2[:, i] * s_i

after which both ranges equal ``sqrt(r1_i r2_i)``. A channel with a zero (or non-finite) range keeps
``s_i = 1``. A layer in two pairs (``pw -> dw -> pw``) is rescaled on both sides, so all pairs are swept
in topological order until ``max_i |s_i - 1| < tol`` in one sweep, or ``max_iters`` sweeps.
Gemm: output channels are the rows of ``B`` when ``transB = 1`` (columns otherwise); ``alpha`` is
untouched and ``beta * C`` is baked into a new ``(M,)`` bias with ``beta = 1``.

Reads/writes ``ctx.bn_stats``: a BN-folded ``L1`` output ``~ N(beta, gamma^2)`` becomes
``~ N(beta / S, (gamma / S)^2)`` with ``S`` the product of the scales applied. Writes new weight and
bias initializers (fresh names; constants are never modified in place) and
``ctx.report["equalize"] = {"pairs", "iterations", "converged", "max_scale_change", "replaced_relu6",
"skipped": [{"pair", "reason"}]}``. The channel-layout helpers below are shared with
``absorb_bias`` and ``correct_bias``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.context import QuantContext
from onnxq.errors import UserError
from onnxq.graph import FreshNames, constant, is_graph_output
from onnxq.pass_infra import Pass, PassResult
from onnxq.passes.assign_specs import node_key

log = logging.getLogger(__name__)

RELU6_MODES = ("skip", "replace")
LAYER_OPS = ("Conv", "Gemm")


class Refused(Exception):
    """A layer or pair cannot be rewritten (message = reason)."""


# ---------------------------------------------------------------------- channel layout
def _default_domain(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


def out_axis(node: gs.Node) -> int:
    """Axis of the weight that indexes output channels."""
    return 0 if node.op == "Conv" or int(node.attrs.get("transB", 0)) else 1


def _grouped(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``w`` as ``(g, C_out/g, C_in/g, taps)``: entry ``[k, o, j]`` reads input channel ``k C_in/g + j``."""
    if node.op == "Gemm":
        m = w if int(node.attrs.get("transB", 0)) else w.T
        return m.reshape(1, m.shape[0], m.shape[1], 1)
    g = int(node.attrs.get("group", 1))
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1)


def out_channels(node: gs.Node, w: np.ndarray) -> int:
    return int(w.shape[out_axis(node)])


def in_channels(node: gs.Node, w: np.ndarray) -> int:
    g4 = _grouped(node, w)
    return int(g4.shape[0] * g4.shape[2])


def out_ranges(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``r_i = max |W|`` over the weights producing output channel ``i``."""
    a = np.moveaxis(np.abs(w), out_axis(node), 0)
    return a.reshape(a.shape[0], -1).max(axis=1)


def in_ranges(node: gs.Node, w: np.ndarray) -> np.ndarray:
    """``r_i = max |W|`` over the weights reading input channel ``i``."""
    return np.abs(_grouped(node, w)).max(axis=(1, 3)).reshape(-1)


def scale_out(node: gs.Node, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    shape = [1] * w.ndim
    shape[out_axis(node)] = -1
    return w * f.reshape(shape)


def scale_in(node: gs.Node, w: np.ndarray, f: np.ndarray) -> np.ndarray:
    g4 = _grouped(node, w)
    scaled = g4 * f.reshape(g4.shape[0], 1, g4.shape[2], 1)
    if node.op == "Gemm" and not int(node.attrs.get("transB", 0)):
        return scaled.reshape(scaled.shape[1:3]).T
    return scaled.reshape(w.shape)


def response(node: gs.Node, w: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Change of each output channel when input channel ``i`` is shifted by ``v_i`` everywhere.

    ``sum_{j,k} W[o, j, k] v[in(o, j)]`` (all spatial taps; exact away from zero-padded borders),
    times ``alpha`` for Gemm.
    """
    g4 = _grouped(node, w)
    out = np.einsum("gojk,gj->go", g4, np.asarray(v, dtype=np.float64).reshape(g4.shape[0], g4.shape[2]))
    alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
    return alpha * out.reshape(-1)


# ---------------------------------------------------------------------- biases and weights
def bias_tensor(node: gs.Node) -> gs.Tensor | None:
    return node.inputs[2] if len(node.inputs) > 2 and not node.inputs[2].is_empty() else None


def effective_bias(node: gs.Node, c_out: int) -> np.ndarray:
    """The per-channel bias as float64 ``(c_out,)`` (Gemm: ``beta * C``); zeros when absent."""
    t = bias_tensor(node)
    if t is None:
        return np.zeros(c_out)
    if not isinstance(t, gs.Constant):
        raise Refused(f"{node.op} bias is not constant")
    b = np.asarray(t.values, dtype=np.float64)
    if node.op == "Gemm":
        b = float(node.attrs.get("beta", 1.0)) * b
        if b.size == 1:
            return np.full(c_out, float(b.reshape(-1)[0]))
        if b.shape not in ((c_out,), (1, c_out)):
            raise Refused(f"Gemm C of shape {b.shape} is not one value per output channel")
    elif b.shape != (c_out,):
        raise Refused(f"Conv bias of shape {b.shape} for {c_out} output channels")
    return b.reshape(-1)


def write_bias(node: gs.Node, values: np.ndarray, names: FreshNames, suffix: str) -> gs.Constant:
    """Give ``node`` a new ``(C_out,)`` bias initializer (Gemm: ``beta`` becomes 1)."""
    old = bias_tensor(node)
    base = old.name if old is not None else f"{node.name or node.op}_bias"
    dtype = np.asarray(node.inputs[1].values).dtype
    t = constant(names.fresh(f"{base}_{suffix}"), np.asarray(values).astype(dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = t
    else:
        node.inputs.append(t)
    if node.op == "Gemm":
        node.attrs["beta"] = 1.0
    return t


def write_weight(node: gs.Node, values: np.ndarray, names: FreshNames, suffix: str) -> None:
    w = node.inputs[1]
    node.inputs[1] = constant(names.fresh(f"{w.name}_{suffix}"), values.astype(np.asarray(w.values).dtype))


def layer_problem(node: gs.Node, *, allow_shared_weight: bool = False) -> str | None:
    """None when ``node`` is a Conv/Gemm whose weight and bias can be rewritten, else the reason."""
    if node.op not in LAYER_OPS or not _default_domain(node):
        return f"{node.op} is not Conv or Gemm"
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if not isinstance(w, gs.Constant):
        return "weight is not a constant initializer"
    values = np.asarray(w.values)
    if not np.issubdtype(values.dtype, np.floating):
        return f"weight dtype {values.dtype} is not float"
    if not allow_shared_weight and len(w.outputs) != 1:
        return f"weight {w.name} is shared with another node"
    b = bias_tensor(node)
    if b is not None and len(b.outputs) != 1:
        return f"bias {b.name} is shared with another node"
    if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or values.ndim != 2):
        return "Gemm with transA=1 or a weight that is not 2-D"
    if node.op == "Conv" and (values.ndim < 3 or values.shape[0] % int(node.attrs.get("group", 1))):
        return f"Conv weight of shape {values.shape} does not match group={node.attrs.get('group', 1)}"
    try:
        effective_bias(node, out_channels(node, values))
    except Refused as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------- pairs
@dataclass(frozen=True, eq=False)
class Pair:
    """``second(act(first(x)))``; kind: "identity", "relu", "leaky" or "bounded" (Clip(0, m), m finite)."""

    first: gs.Node
    second: gs.Node
    act: gs.Node | None
    kind: str

    @property
    def label(self) -> str:
        return f"{node_key(self.first)} -> {node_key(self.second)}"


def clip_bounds(node: gs.Node) -> tuple[float, float] | None:
    """(min, max) of a Clip (attributes before opset 11, inputs after); None when not constant."""
    lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = [lo, hi]
    for i, t in enumerate(node.inputs[1:3]):
        if t.is_empty():
            continue
        if not isinstance(t, gs.Constant) or np.asarray(t.values).size != 1:
            return None
        bounds[i] = float(np.asarray(t.values).reshape(-1)[0])
    return bounds[0], bounds[1]


def _act_kind(node: gs.Node) -> str | None:
    if not _default_domain(node):
        return None
    if node.op == "Relu":
        return "relu"
    if node.op == "LeakyRelu":
        return "leaky"
    if node.op != "Clip":
        return None
    bounds = clip_bounds(node)
    if bounds is None:
        return None
    lo, hi = bounds
    if lo == 0.0:
        return "relu" if hi == np.inf else ("bounded" if hi > 0 else None)
    return "identity" if lo == -np.inf and hi == np.inf else None


def _sole_consumer(graph: gs.Graph, t: gs.Tensor) -> tuple[gs.Node | None, str]:
    if is_graph_output(graph, t):
        return None, f"{t.name} is a graph output"
    if len(t.outputs) != 1:
        return None, f"{t.name} has {len(t.outputs)} consumers"
    return t.outputs[0], ""


def find_pairs(graph: gs.Graph) -> tuple[list[Pair], list[dict[str, str]]]:
    """Candidate pairs in topological order, and the refused ones as ``{"pair", "reason"}``."""
    pairs: list[Pair] = []
    refused: list[dict[str, str]] = []
    for node in graph.nodes:
        if node.op not in LAYER_OPS or not _default_domain(node) or not node.outputs:
            continue
        t = node.outputs[0]
        nxt, why = _sole_consumer(graph, t)
        act = None
        if nxt is not None and nxt.op in ("Relu", "LeakyRelu", "Clip"):
            act = nxt
            if _act_kind(act) is None:
                reason = f"{act.op} {node_key(act)} does not commute with per-channel scaling"
                refused.append({"pair": f"{node_key(node)} -> ?", "reason": reason})
                continue
            t = act.outputs[0]
            nxt, why = _sole_consumer(graph, t)
        if nxt is None:
            if why and t.outputs:
                refused.append({"pair": f"{node_key(node)} -> ?", "reason": f"branching edge: {why}"})
            continue
        if nxt.op not in LAYER_OPS or not _default_domain(nxt):
            continue
        pair = Pair(node, nxt, act, _act_kind(act) if act is not None else "identity")
        reason = _pair_problem(pair, t)
        if reason:
            log.debug("pair %s refused: %s", pair.label, reason)
            refused.append({"pair": pair.label, "reason": reason})
        else:
            pairs.append(pair)
    return pairs, refused


def _pair_problem(pair: Pair, t: gs.Tensor) -> str | None:
    if pair.second.inputs[0] is not t or any(x is t for x in pair.second.inputs[1:]):
        return f"{node_key(pair.second)} does not read {t.name} as its data input only"
    for layer in (pair.first, pair.second):
        problem = layer_problem(layer)
        if problem:
            return f"{node_key(layer)}: {problem}"
    w1, w2 = (np.asarray(n.inputs[1].values) for n in (pair.first, pair.second))
    if out_channels(pair.first, w1) != in_channels(pair.second, w2):
        return f"{out_channels(pair.first, w1)} output channels feed {in_channels(pair.second, w2)} inputs"
    return None


def equalizing_scales(r1: np.ndarray, r2: np.ndarray) -> np.ndarray:
    """``s_i = sqrt(r1_i / r2_i)``, 1 where either range is zero or not finite."""
    ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
    return np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0)


# ---------------------------------------------------------------------- the pass
class EqualizeWeightsPass(Pass):
    """Cross-layer equalization (see module docstring).

    Args:
        relu6: "skip" (a bounded Clip breaks the pair; function-preserving) or "replace"
            (Clip(0, m) -> Relu, changes the float function, then equalize).
        max_iters: most sweeps over all pairs.
        tol: stop when a sweep's ``max |s - 1|`` is below this.
    """

    def __init__(self, *, relu6: str = "skip", max_iters: int = 20, tol: float = 1e-6):
        if relu6 not in RELU6_MODES:
            raise UserError(f"relu6={relu6!r} is not supported: choose one of {', '.join(RELU6_MODES)}")
        if max_iters < 1 or not tol > 0:
            raise UserError(f"max_iters={max_iters}, tol={tol}: need max_iters >= 1 and tol > 0")
        self.relu6, self.max_iters, self.tol = relu6, max_iters, tol

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        report = {"pairs": 0, "iterations": 0, "converged": True, "max_scale_change": 0.0,
                  "replaced_relu6": 0, "skipped": []}
        ctx.report["equalize"] = report
        graph.toposort()
        pairs, refused = find_pairs(graph)
        report["skipped"].extend(refused)
        usable = []
        for p in pairs:
            if p.kind == "bounded":
                if self.relu6 == "skip":
                    report["skipped"].append({"pair": p.label, "reason": (
                        f"bounded activation {node_key(p.act)} (Clip(0, m) is not scale-equivariant; "
                        "relu6='replace' swaps it for Relu)")})
                    continue
                _to_relu(p.act)
                report["replaced_relu6"] += 1
                log.warning("equalize: %s replaced by Relu between %s (the float function changes)",
                            node_key(p.act), p.label)
            usable.append(p)
        report["pairs"] = len(usable)
        if not usable:
            return PassResult(graph, modified=report["replaced_relu6"] > 0)
        changed = self._equalize(graph, ctx, usable, report)
        log.info("equalize: %d pairs, %d sweeps (max |s - 1| = %.3g)", len(usable), report["iterations"],
                 report["max_scale_change"])
        return PassResult(graph, modified=changed or report["replaced_relu6"] > 0)

    def _equalize(self, graph: gs.Graph, ctx: QuantContext, pairs: list[Pair], report: dict) -> bool:
        w: dict[int, np.ndarray] = {}
        b: dict[int, np.ndarray] = {}
        nodes: dict[int, gs.Node] = {}
        for p in pairs:
            for n in (p.first, p.second):
                nodes[id(n)] = n
                values = np.asarray(n.inputs[1].values, dtype=np.float64)
                w[id(n)] = values
                b[id(n)] = effective_bias(n, out_channels(n, values))
        total = {id(p.first): np.ones(out_channels(p.first, w[id(p.first)])) for p in pairs}
        worst = np.inf
        for sweep in range(1, self.max_iters + 1):
            worst = 0.0
            for p in pairs:
                i1, i2 = id(p.first), id(p.second)
                s = equalizing_scales(out_ranges(p.first, w[i1]), in_ranges(p.second, w[i2]))
                w[i1] = scale_out(p.first, w[i1], 1.0 / s)
                b[i1] = b[i1] / s
                w[i2] = scale_in(p.second, w[i2], s)
                total[i1] *= s
                worst = max(worst, float(np.max(np.abs(s - 1.0), initial=0.0)))
            report["iterations"] = sweep
            if worst < self.tol:
                break
        report["converged"] = bool(worst < self.tol)
        report["max_scale_change"] = float(worst)
        if report["iterations"] == 1 and report["converged"]:  # already equalized: leave the graph alone
            return False
        if not report["converged"]:
            log.info("equalize: not converged after %d sweeps (max |s - 1| = %.3g)", self.max_iters, worst)
        names = FreshNames(graph)
        for key, node in nodes.items():
            write_weight(node, w[key], names, "cle")
            if key in total and (bias_tensor(node) is not None):
                write_bias(node, b[key], names, "cle")
        for p in pairs:
            t = p.first.outputs[0].name
            if t in ctx.bn_stats:
                beta, gamma = ctx.bn_stats[t]
                ctx.bn_stats[t] = (beta / total[id(p.first)], gamma / total[id(p.first)])
        return True


def _to_relu(node: gs.Node) -> None:
    """Turn a Clip node into a Relu on the same input and output."""
    x = node.inputs[0]
    node.inputs.clear()
    node.inputs.append(x)
    node.attrs.clear()
    node.op = "Relu"
