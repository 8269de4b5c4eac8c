"""KeepFloatPass: weighted ops planned float stay float in onnxruntime at ORT_ENABLE_ALL.

onnxruntime's ``WeightBiasQuantization`` transformer (ORT_ENABLE_BASIC and up) quantizes, by itself,
the float32 weight initializer of a Conv / ConvTranspose / Gemm whose input comes from a
DequantizeLinear with a per-tensor scale: per-tensor symmetric int8 (``s = max|W| / 127``), which the
QDQ fusion then turns into QLinearConv. A layer the user excluded (``--exclude``), or that onnxq kept
float for a reason, would run as a coarser int8 layer than any onnxq writes, while the report says
it stayed float.

For every such op (float32 constant weight, input ``DQ(q, s, z)`` with one scale) this pass gives it
its own ``DQ(q, s * 1_C, z * 1_C, axis=c)``: the same values, read per channel (``C`` the input
channels, ``c`` the channel axis: 1, or 0 for a Gemm with ``transA``), which the transformer does not
match. The producer's fusion is unchanged (it ends at the Q). Runs for targets whose runtime is
onnxruntime on CPU; writes ``report["kept_float"]`` (the ops guarded).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.pass_infra import Pass, PassResult

_GUARDED = ("Conv", "ConvTranspose", "Gemm")


class KeepFloatPass(Pass):
    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        if ctx.target is None or ctx.target.runtime != "ort-cpu":
            return PassResult(graph, False)
        guarded = []
        for node in list(graph.nodes):
            channels, axis = self._channels(node)
            dq = self._per_tensor_dq(node)
            if channels is None or dq is None:
                continue
            name = f"{node.inputs[0].name}_per_channel_{len(guarded)}"
            scale = constant(f"{name}_scale", np.full(channels, np.asarray(dq.inputs[1].values).reshape(()),
                                                      dtype=np.asarray(dq.inputs[1].values).dtype))
            inputs = [dq.inputs[0], scale]
            if len(dq.inputs) > 2 and dq.inputs[2].name:
                zp = np.asarray(dq.inputs[2].values)
                inputs.append(constant(f"{name}_zero_point", np.full(channels, zp.reshape(()), dtype=zp.dtype)))
            out = gs.Variable(name, dtype=node.inputs[0].dtype, shape=node.inputs[0].shape)
            graph.nodes.append(gs.Node("DequantizeLinear", name=name, attrs={"axis": axis}, inputs=inputs,
                                       outputs=[out]))
            node.inputs[0] = out
            guarded.append(node.name or node.outputs[0].name)
        if guarded:
            graph.toposort()
            ctx.report["kept_float"] = guarded
        return PassResult(graph, bool(guarded))

    @staticmethod
    def _channels(node: gs.Node) -> tuple[int | None, int]:
        """(input channels, channel axis) of a guarded op with a float constant weight, else (None, 0)."""
        if node.op not in _GUARDED or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            return None, 0
        w = node.inputs[1].values
        if np.asarray(w).dtype != np.float32 or np.asarray(w).ndim < 2:
            return None, 0
        shape = np.asarray(w).shape
        if node.op == "Conv":
            return shape[1] * int(node.attrs.get("group", 1)), 1
        if node.op == "ConvTranspose":
            return shape[0], 1
        k = shape[1] if int(node.attrs.get("transB", 0)) else shape[0]
        return k, 0 if int(node.attrs.get("transA", 0)) else 1

    @staticmethod
    def _per_tensor_dq(node: gs.Node) -> gs.Node | None:
        x = node.inputs[0]
        dq = x.inputs[0] if x.inputs else None
        if dq is None or dq.op != "DequantizeLinear" or not isinstance(dq.inputs[1], gs.Constant):
            return None
        return dq if np.asarray(dq.inputs[1].values).size == 1 else None
