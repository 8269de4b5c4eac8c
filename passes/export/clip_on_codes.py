"""ClipOnCodesPass: a Relu / Clip after a weighted op that onnxruntime cannot fold into the Q moves onto the codes.

onnxruntime fuses ``DQ -> Conv -> Relu/Clip -> Q`` into one QLinearConv only when the Q's range lies
inside the activation's bounds (the Q's saturation then does the clipping). A power-of-two scale rarely
allows that: ReLU6's ``[0, 6]`` is not ``[0, 255 s]`` for any ``s = 2^k``, so the Conv stays a float
Conv (two to three times slower than the float model). Quantization is monotone, so for every
``v`` and bounds ``lo <= hi``::

    Q(clip(v, lo, hi)) = clip(Q(v), Q(lo), Q(hi))

and this pass rewrites ``op -> act(lo, hi) -> Q(s, z) -> DQ`` into ``op -> Q(s, z) -> Clip(Q(lo), Q(hi))
-> DQ``: the same codes (an integer Clip on the codes, as 4-bit activations already use), and
onnxruntime fuses ``op -> Q`` into its integer kernel. Where ``[Q(lo), Q(hi)]`` is the whole code range
(the Q's range lies inside the bounds, but onnxruntime might not fold the activation: 1.31 did not fold
into an opset-21 Q) that Clip is the identity and is not written: the Q's saturation does the clipping.
For int8 activations (onnxruntime rewrites each int8 ``Q -> DQ`` pair to uint8, which needs the Q next
to its DQ) it inserts ``Q(s, z) -> DQ`` before the activation instead: ``Q(act(DQ(Q(v)))) = Q(act(v))``
by the same monotonicity.

It applies where the op is a Conv / Gemm / MatMul reading a quantized input, the activation (Relu, or
Clip with constant bounds) is the op's only consumer and a single Q its only consumer, and onnxruntime
keeps the activation (its ``ClipQuantFusion`` / ``ReluQuantFusion`` drop it only when the Q's range is
inside the bounds). Runs for targets whose runtime is onnxruntime on CPU; writes
``report["clip_on_codes"]`` (the activations moved).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import dq_producing

_OPS = ("Conv", "Gemm", "MatMul")


class ClipOnCodesPass(Pass):
    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        if ctx.target is None or ctx.target.runtime != "ort-cpu":
            return PassResult(graph, False)
        moved = []
        for act in list(graph.nodes):
            match = self._match(act, int(graph.opset or 13))
            if match is None:
                continue
            op, q, lo, hi = match
            if self._signed(q):
                self._quantize_before(graph, op, act, q)
                moved.append(act.name or op.name)
                continue
            codes_lo, codes_hi = self._codes(q, lo), self._codes(q, hi)
            q.inputs[0] = op.outputs[0]  # op -> Q directly
            clip_name = f"{act.name or act.outputs[0].name}_on_codes"
            act.outputs.clear()
            act.inputs.clear()
            moved.append(act.name or op.name)
            if (int(codes_lo), int(codes_hi)) == self._zero_and_range(q)[1]:
                continue  # a Clip over the whole code range is the identity: the Q's saturation clips alone
            quantized = q.outputs[0]
            clipped = gs.Variable(f"{quantized.name}_clipped", dtype=quantized.dtype, shape=quantized.shape)
            readers = list(quantized.outputs)
            graph.nodes.append(gs.Node("Clip", name=clip_name,
                                       inputs=[quantized, constant(f"{clipped.name}_lo", codes_lo),
                                               constant(f"{clipped.name}_hi", codes_hi)],
                                       outputs=[clipped]))
            for reader in readers:
                reader.inputs = [clipped if t is quantized else t for t in reader.inputs]
        if moved:
            graph.cleanup().toposort()
            ctx.report["clip_on_codes"] = moved
        return PassResult(graph, bool(moved))

    @staticmethod
    def _signed(q: gs.Node) -> bool:
        zp = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
        return zp is not None and np.issubdtype(np.asarray(zp.values).dtype, np.signedinteger)

    @staticmethod
    def _quantize_before(graph: gs.Graph, op: gs.Node, act: gs.Node, q: gs.Node) -> None:
        """``op -> Q -> DQ -> act -> Q -> DQ`` with the activation's own parameters twice: onnxruntime's
        int8 -> uint8 rewrite needs each Q next to its DQ."""
        x = op.outputs[0]
        codes = gs.Variable(f"{x.name}_quantized_before_act", dtype=None, shape=x.shape)
        values = gs.Variable(f"{x.name}_dequantized_before_act", dtype=x.dtype, shape=x.shape)
        params = list(q.inputs[1:])
        graph.nodes.append(gs.Node("QuantizeLinear", name=f"{codes.name}_Q", inputs=[x, *params], outputs=[codes]))
        graph.nodes.append(gs.Node("DequantizeLinear", name=f"{values.name}_DQ", inputs=[codes, *params],
                                   outputs=[values]))
        act.inputs[0] = values

    @staticmethod
    def _match(act: gs.Node, opset: int) -> tuple[gs.Node, gs.Node, float, float] | None:
        """(op, Q, lo, hi) where the rewrite applies: onnxruntime keeps the activation, because the Q's range
        ``[s (qmin - z), s (qmax - z)]`` is not inside its bounds (to float32 epsilon, onnxruntime's test),
        or the Q has no zero-point input, or its opset (21) is one whose Q onnxruntime does not match."""
        if act.op not in ("Relu", "Clip") or not act.inputs or not act.inputs[0].inputs:
            return None
        op = act.inputs[0].inputs[0]
        if op.op not in _OPS or len(act.inputs[0].outputs) != 1 or dq_producing(op.inputs[0]) is None:
            return None
        consumers = act.outputs[0].outputs
        if len(consumers) != 1 or consumers[0].op != "QuantizeLinear":
            return None
        q = consumers[0]
        bounds = [-np.inf, np.inf]
        if act.op == "Relu":
            bounds[0] = 0.0
        for i, name in ((1, "min"), (2, "max")):
            if len(act.inputs) > i and act.inputs[i].name:
                if not isinstance(act.inputs[i], gs.Constant):
                    return None
                bounds[i - 1] = float(np.asarray(act.inputs[i].values))
            elif name in act.attrs:  # Clip before opset 11
                bounds[i - 1] = float(act.attrs[name])
        if not all(isinstance(t, gs.Constant) for t in q.inputs[1:] if t.name):
            return None
        scale = np.float32(np.asarray(q.inputs[1].values).reshape(-1)[0])
        zero, info = ClipOnCodesPass._zero_and_range(q)
        if np.asarray(q.inputs[1].values).size != 1 or info is None:
            return None
        if opset < 21 and len(q.inputs) > 2 and q.inputs[2].name:
            low, high = scale * np.float32(info[0] - zero), scale * np.float32(info[1] - zero)
            eps = np.finfo(np.float32).eps  # onnxruntime's test, in float32
            if np.float32(bounds[0]) - low <= eps and high - np.float32(bounds[1]) <= eps:
                return None  # the Q's saturation already clips: onnxruntime drops the activation itself
        return op, q, bounds[0], bounds[1]

    @staticmethod
    def _zero_and_range(q: gs.Node) -> tuple[int, tuple[int, int] | None]:
        zp = q.inputs[2] if len(q.inputs) > 2 and q.inputs[2].name else None
        dtype = np.asarray(zp.values).dtype if zp is not None else np.dtype(np.uint8)
        if not np.issubdtype(dtype, np.integer):
            return 0, None
        zero = int(np.asarray(zp.values).reshape(-1)[0]) if zp is not None else 0
        return zero, (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))

    @staticmethod
    def _codes(q: gs.Node, bound: float) -> np.ndarray:
        """``Q(bound)`` as QuantizeLinear computes it (saturated; infinite bounds at the ends)."""
        scale = np.float32(np.asarray(q.inputs[1].values).reshape(-1)[0])
        zero, (lo, hi) = ClipOnCodesPass._zero_and_range(q)
        if not np.isfinite(bound):
            value = lo if bound < 0 else hi
        else:
            value = int(np.clip(np.rint(np.float32(bound) / scale) + zero, lo, hi))
        dtype = np.asarray(q.inputs[2].values).dtype if len(q.inputs) > 2 and q.inputs[2].name else np.uint8
        return np.asarray(value, dtype=dtype)
