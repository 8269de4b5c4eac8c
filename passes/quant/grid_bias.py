"""GridBiasPass: put the float biases of quantized Conv / ConvTranspose / Gemm on their INT32 grid.

A weighted op whose activation input and weight come from DequantizeLinear but whose bias stays
float (``target.quantize_bias`` off, as TensorRT wants it) computes

    y = conv(DQ(x), DQ(W)) + b

exactly in runtimes that add a float bias (OpenVINO, TensorRT). onnxruntime (its
``WeightBiasQuantization`` graph transformer, on at every optimization level above "disabled")
quantizes such a bias itself before it fuses the op:

    b_ort = s_b * int32(round(b / s_b)),   s_b = fl32(s_in * s_w)   (per output channel),

which moves each bias by up to s_b / 2 (on depthwise convolutions s_b can be half an output
step) and, where |b / s_b| > 2^31 - 1 (a channel whose weights are ~0 but whose bias is not, e.g. a
dead channel after BatchNorm folding), casts out of range: x86 gives -2^31, a wrong bias of the
wrong sign. The same file then computes two different functions in two runtimes. This pass makes
the file's float function the one every runtime computes, for targets with ``bias_grid``:

1. weight scales: s_w <- max(s_w, |b| / (s_in (2^31 - 1)) (1 + 1e-6)) per channel (rounded up to
   a power of two for power-of-two scales); a raised channel's codes become
   round(q s_w_old / s_w_new) (its weights are negligible next to its bias);
2. biases: b <- fl32(round(b / s_b) * s_b), so onnxruntime's round(b / s_b) gives back the same
   integers and every runtime adds the same float values (the float function moves by at most
   s_b / 2 per channel, the rounding every INT32-bias target already accepts).

The pass runs last (after reconstruction and bias tuning, which may change scales or biases).
Reads ``ctx.target.bias_grid``, ``ctx.config.scale``; writes the graph (bias constants, codes
and scales of raised weight channels), ``ctx.qparams`` of raised weights and
``ctx.report["grid_bias"]``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxq.core.context import QuantContext
from onnxq.core.graph import constant
from onnxq.core.layers import WEIGHT_INPUTS
from onnxq.core.pass_infra import Pass, PassResult
from onnxq.core.qdq import fit_weight_scale, grid_bias, scaled_dq, weight_of
from onnxq.core.spec import QParams

log = logging.getLogger(__name__)

_OPS = ("Conv", "ConvTranspose", "Gemm")  # the ops onnxruntime quantizes float biases of


def grid_sites(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node, gs.Node, int]]:
    """(op, input DQ, weight DQ, bias index) of each op whose float bias onnxruntime would quantize.

    The conditions are onnxruntime's: a per-tensor DQ on the activation input, a DQ'd constant
    weight with a per-tensor scale or one scale per bias element, and a 1-D float constant bias.
    """
    sites = []
    for node in graph.nodes:
        if node.op not in _OPS:
            continue
        _, b_idx = WEIGHT_INPUTS[node.op]
        if len(node.inputs) <= b_idx or not isinstance(node.inputs[b_idx], gs.Constant):
            continue
        bias = np.asarray(node.inputs[b_idx].values)
        dq_x, dq_w = scaled_dq(node.inputs[0]), scaled_dq(node.inputs[1])
        if bias.ndim != 1 or bias.dtype != np.float32 or dq_x is None or dq_w is None:
            continue
        if not isinstance(dq_w.inputs[0], gs.Constant) or np.asarray(dq_x.inputs[1].values).size != 1:
            continue
        s_w = np.asarray(dq_w.inputs[1].values)
        if s_w.size != 1 and (s_w.ndim != 1 or s_w.size != bias.size or "block_size" in dq_w.attrs):
            continue
        sites.append((node, dq_x, dq_w, b_idx))
    return sites


class GridBiasPass(Pass):
    """Raise weight scales where the bias overflows INT32, then put float biases on their grid."""

    def call(self, graph: gs.Graph, ctx: QuantContext) -> PassResult:
        if not getattr(ctx.target, "bias_grid", False):
            return PassResult(graph, False)
        sites = grid_sites(graph)
        raised = sum(self._fit(dq_x, dq_w, node.inputs[b_idx], ctx) for node, dq_x, dq_w, b_idx in sites)
        moved = 0
        for node, dq_x, dq_w, b_idx in sites:  # after every raise: a weight may feed several ops
            bias = node.inputs[b_idx]
            b = np.asarray(bias.values, dtype=np.float32)
            new = grid_bias(b, float(np.asarray(dq_x.inputs[1].values)), np.asarray(dq_w.inputs[1].values))
            if np.array_equal(new, b):
                continue
            moved += int(np.sum(new != b))
            name = bias.name if len(bias.outputs) == 1 else f"{bias.name}_{node.name}"
            node.inputs[b_idx] = constant(name, new)
        ctx.report["grid_bias"] = {"ops": len(sites), "raised_weight_scales": raised, "moved_biases": moved}
        if raised:
            log.info("grid bias: raised %d weight scale(s) so the bias fits INT32", raised)
        log.debug("grid bias: %d ops, %d bias values moved onto their INT32 grid", len(sites), moved)
        return PassResult(graph, bool(raised or moved))

    @staticmethod
    def _fit(dq_x: gs.Node, dq_w: gs.Node, bias: gs.Constant, ctx: QuantContext) -> int:
        """Raise the weight scales whose bias code would overflow INT32; returns how many."""
        s_in = float(np.asarray(dq_x.inputs[1].values))
        scale_c = dq_w.inputs[1]
        s_w = np.asarray(scale_c.values, dtype=np.float32)
        new, low = fit_weight_scale(s_w, s_in, np.asarray(bias.values), pow2=ctx.config.scale == "pow2")
        if not np.any(low):
            return 0
        codes_c = dq_w.inputs[0]
        q = np.asarray(codes_c.values)
        ratio = s_w.astype(np.float64) / new
        if ratio.ndim == 1:
            shape = [1] * q.ndim
            shape[int(dq_w.attrs.get("axis", 1)) % q.ndim] = -1
            ratio = ratio.reshape(shape)
        dq_w.inputs[0] = constant(codes_c.name, np.rint(q.astype(np.float64) * ratio).astype(q.dtype))
        dq_w.inputs[1] = constant(scale_c.name, new)
        key = weight_of(dq_w)
        old = ctx.qparams.get(key) if key is not None else None
        if old is not None and old.scale.shape == new.shape:
            ctx.qparams[key] = QParams(new, old.zero_point, old.spec)
        return int(np.sum(low))
