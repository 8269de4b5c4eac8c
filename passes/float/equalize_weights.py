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

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.channels import (
    bias_tensor,
    effective_bias,
    in_ranges,
    out_channels,
    out_ranges,
    scale_in,
    scale_out,
    write_bias,
    write_weight,
)
from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames
from onnxq.core.layer_pairs import Pair, find_pairs
from onnxq.core.layers import node_key
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.errors import UserError

log = logging.getLogger(__name__)

RELU6_MODES = ("skip", "replace")


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
