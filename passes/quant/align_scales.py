"""AlignScalesPass: tensors the target wants on one grid get one scale and zero-point.

Runs after CalibratePass and before InsertQDQPass. Reads ``ctx.target``, ``ctx.specs`` and
``ctx.shared``; changes ``ctx.qparams`` (activations), records each aligned group in ``ctx.shared``
(member -> one representative, so passes that tune scales later, such as ReconstructPass, treat the
group as tied) and writes ``ctx.report["align_scales"]``. The graph and ``ctx.specs`` are unchanged.

Groups (union-find over planned activation tensors):
  * ``target.align_concat``: the quantized inputs and the quantized output of every Concat
    (an NPU or TensorRT then writes each input straight into its slice of the output, with no
    requantization);
  * ``target.align_eltwise``: the quantized inputs of every element-wise Add (integer adders
    without per-input rescaling);
  * always: a passthrough output and the tensor whose parameters it reuses (``ctx.shared``), so
    aligning one member keeps s_out = s_in across MaxPool/Reshape/....

Each group gets the parameters of the union of its members' representable ranges:
  * symmetric grids (fixed zero-point z): s = max_i s_i, which covers every member's range
    [(qmin - z) s_i, (qmax - z) s_i] and is a power of two when all s_i are;
  * asymmetric grids: lo = min_i (qmin - z_i) s_i, hi = max_i (qmax - z_i) s_i, then
    s = (hi - lo) / (qmax - qmin), z = round(qmin - lo / s) (:func:`onnxq.core.spec.qparams_from_range`,
    which rounds s up to a power of two for POW2 specs).
A group whose members have different specs (e.g. 8- and 4-bit) is left alone, with a warning.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.spec import QParams, is_power_of_two, qparams_from_range
from onnxq.errors import PassError

log = logging.getLogger(__name__)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def groups(self) -> list[list[str]]:
        out: dict[str, list[str]] = {}
        for x in self.parent:
            out.setdefault(self.find(x), []).append(x)
        return list(out.values())


def same_grid(a: QParams, b: QParams) -> bool:
    """Equal scales and zero-points."""
    return np.array_equal(a.scale, b.scale) and np.array_equal(a.zero_point, b.zero_point)


def union_qparams(members: list[QParams]) -> QParams:
    """One QParams covering the representable ranges of all ``members`` (same spec)."""
    spec = members[0].spec
    if spec.symmetric:
        best = max(members, key=lambda qp: float(qp.scale))
        return QParams(best.scale, best.zero_point, spec)
    lo = min(float((spec.qmin - qp.zero_point) * qp.scale) for qp in members)
    hi = max(float((spec.qmax - qp.zero_point) * qp.scale) for qp in members)
    return qparams_from_range(np.float64(lo), np.float64(hi), spec)


def alignment_groups(graph: gs.Graph, ctx: QuantContext) -> list[list[str]]:
    """The groups of planned activation tensors that must share parameters (size >= 2)."""
    target = ctx.target
    uf = _UnionFind()
    aligned: set[str] = set()

    def quantized(t: gs.Tensor) -> bool:
        return not isinstance(t, gs.Constant) and t.name in ctx.qparams and t.name not in ctx.float_weights

    for node in graph.nodes:
        members: list[str] = []
        if node.op == "Concat" and target.align_concat:
            members = [t.name for t in [*node.inputs, *node.outputs[:1]] if quantized(t)]
        elif node.op == "Add" and target.align_eltwise:
            members = [t.name for t in node.inputs if quantized(t)]
        for name in members[1:]:
            uf.union(members[0], name)
        if len(members) > 1:
            aligned.update(members)
    for out, src in ctx.shared.items():
        if out in ctx.qparams and src in ctx.qparams:
            uf.union(src, out)
    return [sorted(g) for g in uf.groups() if len(g) > 1 and aligned.intersection(g)]


class AlignScalesPass(Pass):
    """Give Concat (and, per target, Add) inputs one scale and zero-point (see module docstring)."""

    def requires(self, graph: gs.Graph, ctx: QuantContext) -> None:
        if ctx.target is None:
            raise PassError("AlignScalesPass needs ctx.target")
        missing = [n for n in ctx.specs if n in ctx.shared and n not in ctx.qparams]
        if missing:
            raise PassError(f"AlignScalesPass runs after CalibratePass ({missing[0]} has no qparams)")

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        changed = 0
        groups = alignment_groups(graph, ctx)
        for group in groups:
            qps = [ctx.qparams[n] for n in group]
            if len({qp.spec for qp in qps}) > 1:
                log.warning("not aligning %s: different grids (%s)", ", ".join(group),
                            "; ".join(sorted({qp.spec.describe() for qp in qps})))
                continue
            new = union_qparams(qps)
            for name, qp in zip(group, qps):
                if not same_grid(qp, new):
                    changed += 1
                ctx.qparams[name] = new
            roots = [n for n in group if n not in ctx.shared]
            for name in roots[1:]:
                ctx.shared[name] = roots[0]
        ctx.report["align_scales"] = {"groups": len(groups), "tensors_changed": changed}
        if changed:
            log.info("aligned %d group(s) of activations, %d tensor(s) changed", len(groups), changed)
        return PassResult(graph, False)  # the graph itself is unchanged

    def ensures(self, graph: gs.Graph, ctx: QuantContext) -> None:
        for group in alignment_groups(graph, ctx):
            qps = [ctx.qparams[n] for n in group]
            if len({qp.spec for qp in qps}) > 1:
                continue
            first = qps[0]
            for name, qp in zip(group[1:], qps[1:]):
                if not same_grid(qp, first):
                    raise PassError(f"{name} is not aligned with {group[0]}")
            if first.spec.pow2 and not np.all(is_power_of_two(first.scale)):
                raise PassError(f"aligned scale of {group[0]} is not a power of two")
