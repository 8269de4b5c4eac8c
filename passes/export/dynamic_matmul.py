"""DynamicMatMulPass: weight MatMuls quantize their input at run time (``activations.dynamic``).

What onnxruntime's transformer users run (its ``quantize_dynamic``): instead of a range calibrated once,
each MatMul input is quantized per call to the uint8 grid of its own min/max (``DynamicQuantizeLinear``:
``s_x = (max(x, 0) - min(x, 0)) / 255``, ``z_x = round(-min(x, 0) / s_x)``), so an outlier in one batch
costs resolution in that batch only. For ``Y = X W`` with int8 weight codes ``q_W`` and per-column
scales ``s_W`` (symmetric, zero-point 0)::

    Y = s_x s_W * (q_x - z_x) q_W          (MatMulInteger: int32 sums of (q_x - z_x) q_W)

written as ``DynamicQuantizeLinear(x) -> MatMulInteger(q_x, q_W, z_x) -> Cast(float) -> Mul(s_x * s_W)``,
which onnxruntime fuses into ``DynamicQuantizeMatMul`` (the uint8 x int8 GEMM with the scale applied to
the int32 result). The weight codes are those the static pipeline wrote (GPTQ, fitted to the pair limit
of :mod:`onnxq.targets.ort_kernels`, which holds for any uint8 activation code), so the same file runs
without saturating on every CPU. The input's static ``Q -> DQ`` is dropped where nothing else reads it
(float readers of a float op's output already read it unrounded: InsertQDQPass); the MatMul's output keeps
whatever the static plan gave it.

Applies to every ``MatMul`` whose weight is ``DQ(int8 codes, s_W[, 0])`` per column or per tensor and
whose input is a dequantized activation. Runs for targets whose runtime is onnxruntime on CPU (the
config refuses others); writes ``report["dynamic_matmuls"]`` (the MatMuls rewritten).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import FreshNames
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import constant_dq, dq_producing, quantized_source


class DynamicMatMulPass(Pass):
    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        if not ctx.config.activations.dynamic:
            return PassResult(graph, False)
        names = FreshNames(graph)
        dynamic: dict[str, tuple[gs.Variable, gs.Variable, gs.Variable]] = {}  # x -> (q_x, s_x, z_x)
        rewritten = []
        for node in list(graph.nodes):
            match = _match(node)
            if match is None:
                continue
            x, codes, scale = match  # the weight DQ's own constants
            if x.name not in dynamic:
                q_x = gs.Variable(names.fresh(f"{x.name}_dynamic_quantized"), dtype=np.uint8)
                s_x = gs.Variable(names.fresh(f"{x.name}_dynamic_scale"), dtype=np.float32, shape=[])
                z_x = gs.Variable(names.fresh(f"{x.name}_dynamic_zero_point"), dtype=np.uint8, shape=[])
                graph.nodes.append(gs.Node("DynamicQuantizeLinear", names.fresh(f"{x.name}_DynamicQuantizeLinear"),
                                           inputs=[x], outputs=[q_x, s_x, z_x]))
                dynamic[x.name] = (q_x, s_x, z_x)
            q_x, s_x, z_x = dynamic[x.name]
            base = node.name or node.outputs[0].name
            acc = gs.Variable(names.fresh(f"{base}_int32"), dtype=np.int32)
            acc_f = gs.Variable(names.fresh(f"{base}_int32_float"), dtype=np.float32)
            s_xw = gs.Variable(names.fresh(f"{base}_scale"), dtype=np.float32)
            out = node.outputs[0]
            graph.nodes += [
                gs.Node("MatMulInteger", names.fresh(f"{base}_MatMulInteger"), inputs=[q_x, codes, z_x], outputs=[acc]),
                gs.Node("Cast", names.fresh(f"{base}_Cast"), attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
                gs.Node("Mul", names.fresh(f"{base}_scales"), inputs=[s_x, scale], outputs=[s_xw]),
            ]
            node.op, node.inputs, node.attrs = "Mul", [acc_f, s_xw], {}
            node.name = names.fresh(f"{base}_rescale")
            node.outputs = [out]
            rewritten.append(base)
        if rewritten:
            graph.cleanup().toposort()
            ctx.report["dynamic_matmuls"] = rewritten
        return PassResult(graph, bool(rewritten))


def _match(node: gs.Node) -> tuple[gs.Tensor, gs.Constant, gs.Constant] | None:
    """(float input, int8 codes [K, N], float32 scale [N] or []) of a rewritable MatMul, or None."""
    if node.op != "MatMul" or len(node.inputs) != 2:
        return None
    w_dq = constant_dq(node.inputs[1])
    x_dq = dq_producing(node.inputs[0])
    if w_dq is None or x_dq is None or constant_dq(node.inputs[0]) is not None:
        return None
    x = quantized_source(x_dq)
    codes, scale = w_dq.inputs[0], w_dq.inputs[1]
    values = np.asarray(codes.values)
    if x is None or values.dtype != np.int8 or values.ndim != 2:
        return None
    if len(w_dq.inputs) > 2 and w_dq.inputs[2].name and np.any(np.asarray(w_dq.inputs[2].values)):
        return None  # weight zero-points: not the symmetric grid this rewrite assumes
    s = np.asarray(scale.values)
    if s.dtype != np.float32 or s.size not in (1, values.shape[1]) or \
            (s.size > 1 and (s.ndim != 1 or int(w_dq.attrs.get("axis", 1)) not in (1, -1))):
        return None
    return x, codes, scale
