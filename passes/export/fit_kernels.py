"""FitKernelsPass: the last guarantee that no CPU's onnxruntime kernel saturates an 8-bit weight pair.

InsertQDQPass rounds 8-bit weights within the pair limit of :mod:`onnxq.targets.ort_kernels`
(:mod:`onnxq.targets.weight_codes`), and reconstruction repairs what it learns block by block; a later
pass may still move codes. This pass re-checks every 8-bit weight of a Conv / Gemm / MatMul whose input
is quantized and, where a pair of one sign passes ``|q_k| + |q_{k+1}| <= 128`` along the kernel's
reduction order, trims it at the least squared error to the weight's real codes (``w / s + z`` from
``ctx.float_weights``; the codes themselves when the float weight is unknown)
(:func:`~onnxq.targets.ort_kernels.repair_pairs`). Scales and biases are unchanged. Reads
``ctx.config.kernels``; writes the weight constants and ``report["weight_rounding"]["repaired_at_export"]``
(the pairs repaired here).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.layers import WEIGHT_INPUTS
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import constant_dq, dq_producing, weight_of
from onnxq.core.spec import QParams, real_codes
from onnxq.targets.ort_kernels import constrained_layout, pair_violations, repair_weight, saturates


class FitKernelsPass(Pass):
    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        if not saturates(ctx.config.kernels):
            return PassResult(graph, False)
        repaired = 0
        for node in graph.nodes:
            if node.op not in WEIGHT_INPUTS:
                continue
            dq = constant_dq(node.inputs[WEIGHT_INPUTS[node.op][0]])
            if dq is None:
                continue
            codes = np.asarray(dq.inputs[0].values)
            bits = 8 if codes.dtype.itemsize == 1 else 0
            layout = constrained_layout(node, codes.shape, bits, ctx.config.kernels,
                                        dq_producing(node.inputs[0]) is not None)
            if layout is None:
                continue
            bad = int(pair_violations(layout.to_matrix(codes.astype(np.int64))).sum())
            if not bad:
                continue
            dq.inputs[0] = constant(dq.inputs[0].name, repair_weight(codes, self._ideal(dq, codes, ctx), layout))
            repaired += bad
        ctx.report.setdefault("weight_rounding", {})["repaired_at_export"] = repaired
        return PassResult(graph, bool(repaired))

    @staticmethod
    def _ideal(dq: gs.Node, codes: np.ndarray, ctx: QuantContext) -> np.ndarray:
        """The weight's real codes ``w / s + z``, or the codes when the float weight is unknown."""
        w = weight_of(dq)
        qp = ctx.qparams.get(w) if w is not None else None
        if qp is None or w not in ctx.float_weights:
            return codes.astype(np.float64)
        scale = np.asarray(dq.inputs[1].values, dtype=np.float32)
        zero = np.asarray(dq.inputs[2].values) if len(dq.inputs) > 2 and dq.inputs[2].name else np.zeros(
            scale.shape, codes.dtype)
        return real_codes(ctx.float_weights[w], QParams(scale, zero, qp.spec))
